#!/usr/bin/env python3
"""tokengate's benchmark: tokengate against a tonic echo, a minimal translator and a direct
call, as same-run ratios; then the token broker's upstream POSTs per client call (broker.py).

Run through bench/run, which builds the release binaries and this script's venv first.
Placement (../shared/reference/performance.md §6): the system under test (tokengate, the echo,
the translator) is pinned to SUT_CPU; h2load, the mock upstream and Redis share LOAD_CPU. The
direct call to the upstream is made from SUT_CPU, so it crosses cores as tokengate's own
upstream call does.

The subjects: the echo (GetToken answered with a canned token: the ceiling for a gRPC service
of this shape); the translator (the echo's server making one reqwest form POST per call and
decoding the JSON: the floor for a call that goes upstream); tokengate forwarding (a registered
client with `cache = false`, so every call goes upstream); tokengate answering cache hits, with
the memory backend and with Redis behind it; optionally tokengate built from before the broker
(`--before`); and the direct HTTP/1.1 call.

h2load cannot read grpc-status, so every run is checked: a real GetToken before and after it
(from the expected source), no failed stream, a DATA byte count that only successful answers
reach (an error is trailers-only), and the upstream's POST count: exactly one per call for a
forwarding subject, none at all for a cache hit or the echo. A cache-hit run against the Redis
backend also counts Redis commands (health-check PINGs aside): a fresh local layer needs none.

Every round runs on fresh processes. The CPU that other processes use is counted during each
timed run (procs.Foreign): the harness waits for a quiet machine before a round, and runs a
round again when others disturbed it (both bounded; the table says how often it happened).

What metrics cost (MetricsCost; `--only metrics` measures nothing else): the same tokengate
with and without `server.metrics_listen`, in interleaved rounds of fresh processes: its CPU per
call at saturation on the two hot paths (cache hit, forwarding), with `/metrics` scraped every
second, as Prometheus would, while the metrics-on process is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import broker
from procs import (BENCH, CACHED_CLIENT, CLIENT_SECRET, PASS_CLIENT, ROOT, TOKENGATE,
                   BenchError, Foreign, Redis, Server, fetch, run, upstream_stats,
                   working_commands, write_config)

METHOD = "/tokengate.v1.TokenService/GetToken"
GRPC_HEADERS = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
SUT_CPU, LOAD_CPU = 1, 0
HALF_RATE_CONNECTIONS = 16
# Other processes' CPU (in cores) beyond which a timed run counts as disturbed; the kernel's
# own threads stay well below it on a quiet machine.
DISTURBED_CORES = 0.05
TICKS = os.sysconf("SC_CLK_TCK")
# Metrics on may cost at most this much more CPU per call (issue 11).
METRICS_BUDGET = 0.03
# The hot paths whose cost with metrics on is measured, by their subject names.
METRICS_PATHS = ("hit", "tokengate")
# Prometheus 2.x's own Accept header: OpenMetrics first.
SCRAPE_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                 "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
# The subjects, in the order of the first round (later rounds rotate it).
SUBJECTS = ["echo", "translator", "tokengate", "hit", "hit_redis", "before", "before_hit",
            "direct"]
LABELS = {"echo": "tonic echo (no upstream)", "translator": "minimal translator → upstream",
          "tokengate": "tokengate forwarding (cache = false) → upstream",
          "hit": "tokengate cache hit (memory)", "hit_redis": "tokengate cache hit (Redis backend)",
          "before": "tokengate before the broker → upstream",
          "before_hit": "tokengate --before's cache hit (memory)",
          "direct": "direct HTTP/1.1 call to the upstream"}


@dataclass
class Settings:
    """How long and how often; `--smoke` shrinks everything to check that the harness works."""

    rounds: int = 5
    # What metrics cost is a few per cent; one fresh process differs from the next by about
    # as much, so its median takes more rounds.
    metrics_rounds: int = 10
    warmup_s: int = 3
    saturation_s: int = 10
    latency_calls: int = 20_000
    half_rate_s: int = 10
    inflight_s: int = 5
    inflight_delay: str = "200ms"
    startup_runs: int = 20
    # Rounds run again, at most, when other processes disturbed one.
    extra_rounds: int = 5
    # Before each round, wait up to this long in all for other processes to go quiet.
    quiet_wait_s: int = 1800

    @classmethod
    def smoke(cls) -> "Settings":
        return cls(rounds=1, metrics_rounds=1, warmup_s=1, saturation_s=1, latency_calls=300,
                   half_rate_s=1, inflight_s=2, startup_runs=3, extra_rounds=0, quiet_wait_s=0)


@dataclass
class Subject:
    """A gRPC server under test, the request it gets, and what a valid run of it looks like."""

    name: str
    # The process that serves it (several subjects may share one).
    proc: str
    frame: Path
    client: str
    # The `source` its answers must carry (None: not checked; the echo sets none).
    source: str | None
    # "one": exactly one upstream POST per call; "none": no POST at all.
    posts: str
    redis: Redis | None = None
    server: Server | None = None


def check(subject: Subject) -> int:
    """One real GetToken; returns the response frame size."""
    argv = [str(BENCH), "check", "--addr", f"http://{subject.server.addr}",
            "--client", subject.client]
    if subject.source:
        argv += ["--source", subject.source]
    return int(run(argv, cpu=LOAD_CPU))


# ---------------------------------------------------------------------------------------------
# h2load


@dataclass
class Load:
    """One h2load run's outcome."""

    done: int
    succeeded: int
    failed: int
    errored: int
    rps: float
    data_bytes: int
    started: int = 0
    latencies_us: list[int] = field(default_factory=list)
    # Redis commands (health-check PINGs aside) during the run, when Redis was behind it.
    redis_commands: int | None = None
    # Cores' worth of CPU that processes other than the benchmark's used during the run.
    foreign_cores: float = 0.0


def parse_h2load(out: str) -> Load:
    """Reads h2load's summary (the `finished in`, `requests:` and `traffic:` lines)."""

    def num(pattern: str) -> float:
        m = re.search(pattern, out)
        if not m:
            raise BenchError(f"h2load printed no {pattern!r}:\n{out}")
        return float(m.group(1))

    return Load(
        done=int(num(r"(\d+) done")),
        succeeded=int(num(r"(\d+) succeeded")),
        failed=int(num(r"(\d+) failed")),
        errored=int(num(r"(\d+) errored")),
        rps=num(r"finished in [\d.]+m?s, ([\d.]+) req/s"),
        data_bytes=int(num(r"traffic: .*\((\d+)\) data")),
        started=int(num(r"(\d+) started")),
    )


def parse_log(path: Path) -> list[int]:
    """Per-request latencies (µs) from h2load's --log-file; a failed stream is an error."""
    latencies = []
    for line in path.read_text().splitlines():
        _start, status, duration = line.split("\t")[:3]
        if status != "200":
            raise BenchError(f"a request in {path.name} ended with status {status}")
        latencies.append(int(duration))
    return latencies


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        raise BenchError("no samples")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return float(ordered[int(rank) - 1])


def verify(load: Load, url: str, min_bytes_per_call: int) -> None:
    """Refuses a run in which any call failed or any answer was not a token: a gRPC error is
    trailers-only, so it adds no DATA bytes."""
    if load.failed or load.errored or load.succeeded != load.done or load.done == 0:
        raise BenchError(f"h2load against {url}: {load}")
    if load.data_bytes < load.done * min_bytes_per_call:
        raise BenchError(f"h2load against {url}: {load.data_bytes} DATA bytes for {load.done} "
                         f"calls; some answers were not tokens")


def verify_posts(name: str, expect: str, posts: int, load: Load) -> None:
    """The upstream's POST count during a run. "one": every finished call made exactly one
    (calls that h2load started but cut off at its deadline may have made theirs too, so up
    to `started`); "none": not one, so every answer came from the cache (or the echo)."""
    if expect == "one" and not load.done <= posts <= load.started:
        raise BenchError(f"{name}: {load.done} calls ({load.started} started) but {posts} "
                         f"upstream POSTs; a forwarding run makes one per call")
    if expect == "none" and posts:
        raise BenchError(f"{name}: {posts} upstream POSTs during {load.done} calls that should "
                         f"all be answered without one")


def h2load(url: str, cpu: int, args: list[str], headers: list[str], body: Path,
           min_bytes_per_call: int, log: Path | None = None) -> Load:
    argv = ["h2load", "-t1", *args, *headers, "-d", str(body)]
    if log is not None:
        argv += [f"--log-file={log}"]
    load = parse_h2load(run([*argv, url], cpu=cpu))
    verify(load, url, min_bytes_per_call)
    if log is not None:
        load.latencies_us = parse_log(log)
        if len(load.latencies_us) != load.done:
            raise BenchError(f"{log.name}: {len(load.latencies_us)} rows for {load.done} calls")
    return load


class Bench:
    """The subjects' processes, started afresh every round: one process's memory layout can
    make it a few per cent faster or slower than the next one of the same binary, so each
    round measures new instances and the rounds' medians spread that over five of each."""

    def __init__(self, settings: Settings, work: Path, before: Path | None = None,
                 foreign: Foreign | None = None):
        self.s = settings
        self.work = work
        self.foreign = foreign
        self.live: dict[str, Server] = {}
        self.redis: Redis | None = None
        self.upstream: Server | None = None
        try:
            self._start(before)
        except BaseException:
            self.close()
            raise

    def _start(self, before: Path | None) -> None:
        work = self.work
        frames = {}
        for client in (PASS_CLIENT, CACHED_CLIENT):
            frames[client] = work / f"{client}.grpc"
            run([str(BENCH), "frame", str(frames[client]), "--client", client])
        self.upstream = Server("upstream", [str(BENCH), "upstream"], LOAD_CPU)
        self.redis = Redis(cpu=LOAD_CPU)
        key = work / "cache.key"
        key.write_bytes(os.urandom(32))
        serve = lambda config: [str(TOKENGATE), "serve", "--config", str(config)]  # noqa: E731
        # name → argv and what to wait for once it listens
        self.specs: dict[str, tuple[list[str], tuple[str, ...]]] = {
            "tokengate": (serve(write_config(work / "tokengate.toml", self.upstream)), ()),
            "tokengate (redis)": (serve(write_config(
                work / "redis.toml", self.upstream,
                cache={"backend": "redis", "key_file": str(key), "redis_url": self.redis.url})),
                (broker.JOINED,)),
            "echo": ([str(BENCH), "echo"], ()),
            "translator": ([str(BENCH), "translator", "--token-url",
                            f"http://{self.upstream.addr}/restapi/oauth/token",
                            "--client-id", PASS_CLIENT, "--client-secret", CLIENT_SECRET], ()),
        }
        subjects = [
            Subject("tokengate", "tokengate", frames[PASS_CLIENT], PASS_CLIENT, "upstream", "one"),
            Subject("echo", "echo", frames[PASS_CLIENT], PASS_CLIENT, None, "none"),
            Subject("translator", "translator", frames[PASS_CLIENT], PASS_CLIENT, None, "one"),
            Subject("hit", "tokengate", frames[CACHED_CLIENT], CACHED_CLIENT, "cache", "none"),
            Subject("hit_redis", "tokengate (redis)", frames[CACHED_CLIENT], CACHED_CLIENT,
                    "cache", "none", self.redis),
        ]
        if before is not None:
            # A build that has the broker reads `cache = false` (and is measured on its cache
            # hit too); one from before the broker reads no cache keys at all.
            has_broker = os.environ.get("BENCH_BEFORE_HAS_BROKER") == "1"
            config = write_config(work / "before.toml", self.upstream, broker=has_broker)
            self.specs["before"] = ([str(before), "serve", "--config", str(config)], ())
            subjects.append(Subject("before", "before", frames[PASS_CLIENT], PASS_CLIENT, None,
                                    "one"))
            if has_broker:
                subjects.append(Subject("before_hit", "before", frames[CACHED_CLIENT],
                                        CACHED_CLIENT, "cache", "none"))
        self.subjects = {s.name: s for s in subjects}

        tokengate = self._launch("tokengate")
        self.rss_idle_kib = tokengate.status("VmRSS")
        self.rss_idle_anon_kib = tokengate.status("RssAnon")
        # tokengate's first POST, before any other subject's: the direct call replays it.
        self.frame_bytes = {"tokengate": check(self.subjects["tokengate"])}
        for name in self.specs:
            if name != "tokengate":
                self._launch(name)
        self.echo_rss_idle_kib = self.live["echo"].status("VmRSS")
        self._prime()
        for subject in subjects:
            self.frame_bytes[subject.name] = check(subject)

        # The direct call replays, byte for byte, the POST tokengate made first.
        first = json.loads(fetch(f"http://{self.upstream.addr}/first-request"))
        self.direct_body = work / "direct.form"
        self.direct_body.write_text(first["body"])
        self.direct_url = f"http://{self.upstream.addr}{first['path']}"
        self.direct_headers = ["-H", f"content-type: {first['content_type']}",
                               "-H", f"authorization: {first['authorization']}"]
        self.token_bytes = len(fetch(self.direct_url, "POST"))

    def _launch(self, name: str) -> Server:
        argv, watch = self.specs[name]
        server = Server(name, argv, SUT_CPU, watch=watch)
        self.live[name] = server
        for w in watch:
            server.wait_for(w)
        for subject in self.subjects.values():
            if subject.proc == name:
                subject.server = server
        return server

    def _prime(self) -> None:
        """A cache-hit subject's first call fills the cache (or, with Redis, may already
        find the previous instance's entry there)."""
        for subject in self.subjects.values():
            if subject.source == "cache":
                check(Subject(**{**subject.__dict__, "source": None}))

    def restart(self) -> None:
        """New instances of every subject (the upstream and Redis stay)."""
        for name in list(self.live):
            self.live.pop(name).stop()
            self._launch(name)
        self._prime()

    def close(self) -> None:
        for server in reversed(list(self.live.values())):
            server.stop()
        if self.upstream is not None:
            self.upstream.stop()
        if self.redis is not None:
            self.redis.stop()

    @property
    def order(self) -> list[str]:
        return [name for name in SUBJECTS if name in self.subjects or name == "direct"]

    # One call of each kind of run --------------------------------------------------------------

    def grpc(self, subject: Subject, args: list[str], log: Path | None = None) -> Load:
        """An h2load run against a gRPC server, checked before, during and after."""
        check(subject)
        posts = upstream_stats(self.upstream)["posts"]
        commands = working_commands(subject.redis.commandstats()) if subject.redis else 0
        load = self.watched(lambda: h2load(
            f"http://{subject.server.addr}{METHOD}", LOAD_CPU, args, GRPC_HEADERS, subject.frame,
            self.frame_bytes[subject.name] - 16, log))
        sent = upstream_stats(self.upstream)["posts"] - posts
        if subject.redis:
            load.redis_commands = working_commands(subject.redis.commandstats()) - commands
        verify_posts(subject.name, subject.posts, sent, load)
        check(subject)
        return load

    def direct(self, args: list[str], log: Path) -> Load:
        return self.watched(lambda: h2load(self.direct_url, SUT_CPU, ["--h1", *args],
                                           self.direct_headers, self.direct_body,
                                           self.token_bytes, log))

    def watched(self, measure) -> Load:
        """Runs `measure` and notes how much CPU other processes used meanwhile."""
        if self.foreign is None:
            return measure()
        cpu, wall = self.foreign.seconds(), time.monotonic()
        load = measure()
        load.foreign_cores = (self.foreign.seconds() - cpu) / (time.monotonic() - wall)
        return load

    def saturate(self, subject: Subject) -> dict:
        """Closed-loop saturation: req/s, and the server's CPU per call from /proc."""
        busy0 = core_busy()
        ticks = subject.server.cpu_ticks()
        load = self.grpc(subject, ["-c4", "-m32", f"-D{self.s.saturation_s}"])
        ticks = subject.server.cpu_ticks() - ticks
        busy = core_busy(busy0)
        out = {"rps": load.rps, "calls": load.done,
               "cpu_us_per_call": ticks / TICKS * 1e6 / load.done,
               "sut_core_busy": busy[SUT_CPU], "load_core_busy": busy[LOAD_CPU],
               "foreign_cores": load.foreign_cores}
        if load.redis_commands is not None:
            out["redis_commands"] = load.redis_commands
        return out

    def latency(self, name: str, log: Path) -> Load:
        args = ["-c1", "-m1", f"-n{self.s.latency_calls}"]
        if name == "direct":
            return self.direct(args, log)
        return self.grpc(self.subjects[name], args, log)

    # The whole benchmark ----------------------------------------------------------------------

    def warm_up(self, log: Path) -> None:
        warm = [f"-D{self.s.warmup_s}", "-c4", "-m32"]
        for subject in self.subjects.values():
            self.grpc(subject, warm)
        self.direct(warm, log)

    def one_round(self, order: list[str], r: int) -> tuple[dict, dict[str, list[int]]]:
        """One round: warm-up, then each subject's latency and saturation runs."""
        self.warm_up(self.work / f"warm-{r}.log")
        result: dict = {"latency": {}, "saturation": {}, "redis_commands": {},
                        "foreign_cores": {}}
        latencies = {}
        k = r % len(order)
        for name in order[k:] + order[:k]:  # rotate so drift spreads evenly
            load = self.latency(name, self.work / f"{name}-{r}.log")
            lat = latencies[name] = load.latencies_us
            result["latency"][name] = {"p50": percentile(lat, 50), "p99": percentile(lat, 99)}
            result["foreign_cores"][f"{name}_latency"] = load.foreign_cores
            if load.redis_commands is not None:
                result["redis_commands"][f"{name}_latency"] = [load.redis_commands, len(lat)]
            if name != "direct":
                sat = self.saturate(self.subjects[name])
                result["saturation"][name] = sat
                result["foreign_cores"][f"{name}_saturation"] = sat["foreign_cores"]
                if "redis_commands" in sat:
                    result["redis_commands"][f"{name}_saturation"] = [sat["redis_commands"],
                                                                     sat["calls"]]
        derive(result)
        return result, latencies

    def measure(self) -> dict:
        rounds, self.discarded, pooled = self.rounds()
        return self.half_and_memory(rounds, pooled)

    def rounds(self) -> tuple[list[dict], list[dict], dict[str, list[int]]]:
        """`rounds` rounds, each on fresh processes. A round during which other processes
        used more than DISTURBED_CORES in any run is set aside and run again, up to
        `extra_rounds` times; set-aside rounds stay in the JSON and are counted in the table."""
        s = self.s
        order = self.order
        rounds: list[dict] = []
        discarded: list[dict] = []
        pooled: dict[str, list[int]] = {name: [] for name in order}
        attempt = 0
        self.waited_s = 0.0
        while len(rounds) < s.rounds:
            self.wait_quiet()
            if attempt:
                self.restart()
            result, latencies = self.one_round(order, attempt)
            attempt += 1
            busy = max(result["foreign_cores"].values())
            retries_left = s.rounds + s.extra_rounds - attempt >= s.rounds - len(rounds)
            if busy > DISTURBED_CORES and retries_left:
                discarded.append(result)
                print(f"round set aside: other processes used {busy:.2f} of a core", flush=True)
                continue
            for name, lat in latencies.items():
                pooled[name] += lat
            rounds.append(result)
            print(f"round {len(rounds)}/{s.rounds}: {json.dumps(result)}", flush=True)
        return rounds, discarded, pooled

    def wait_quiet(self, probe_s: float = 5) -> None:
        """Waits, within what is left of `quiet_wait_s`, until other processes have used at
        most DISTURBED_CORES over `probe_s` seconds; then the round starts whatever they do."""
        if self.foreign is None:
            return
        while self.waited_s < self.s.quiet_wait_s:
            before, start = self.foreign.seconds(), time.monotonic()
            time.sleep(probe_s)
            elapsed = time.monotonic() - start
            busy = (self.foreign.seconds() - before) / elapsed
            if busy <= DISTURBED_CORES:
                return
            self.waited_s += elapsed
            print(f"waiting for a quiet machine: other processes use {busy:.2f} of a core",
                  flush=True)

    def half_and_memory(self, rounds: list[dict], pooled: dict[str, list[int]]) -> dict:
        """Latency at half the saturation rate, and tokengate's memory after the load."""
        s = self.s
        half = {}
        for name in ("tokengate", "echo"):
            rate = statistics.median(x["saturation"][name]["rps"] for x in rounds) / 2
            # One stream per connection: h2load's rate timer sends a connection's streams in
            # bursts, which would measure its own queueing rather than the server's.
            per_conn = max(1, round(rate / HALF_RATE_CONNECTIONS))
            load = self.grpc(self.subjects[name],
                             [f"-c{HALF_RATE_CONNECTIONS}", "-m1", f"--rps={per_conn}",
                              f"-D{s.half_rate_s}"],
                             self.work / f"half-{name}.log")
            half[name] = {"target_rps": per_conn * HALF_RATE_CONNECTIONS, "rps": load.rps,
                          "p50": percentile(load.latencies_us, 50),
                          "p99": percentile(load.latencies_us, 99)}
        print(f"half saturation: {json.dumps(half)}", flush=True)

        tokengate = self.live["tokengate"]
        rss_after_kib = tokengate.status("VmRSS")
        return {"rounds": rounds, "discarded_rounds": self.discarded,
                "waited_for_quiet_s": self.waited_s, "half": half,
                "pooled_latency_us": pooled,
                "rss": {"tokengate_idle_kib": self.rss_idle_kib,
                        "tokengate_idle_anon_kib": self.rss_idle_anon_kib,
                        "tokengate_after_load_kib": rss_after_kib,
                        "echo_idle_kib": self.echo_rss_idle_kib,
                        "tokengate_threads": tokengate.threads()}}


def derive(result: dict) -> None:
    """A round's ratios, from its latency and saturation figures (in place)."""
    lat, sat = result["latency"], result["saturation"]
    cpu = {name: x["cpu_us_per_call"] for name, x in sat.items()}
    result["added"] = {p: lat["tokengate"][p] - lat["echo"][p] - lat["direct"][p]
                       for p in ("p50", "p99")}
    result["cpu_ratio"] = cpu["echo"] / cpu["tokengate"]
    result["vs_translator"] = {"cpu_ratio": cpu["translator"] / cpu["tokengate"],
                               "p50_delta": lat["tokengate"]["p50"] - lat["translator"]["p50"]}
    result["hit_vs_echo"] = {name: {"cpu_ratio": cpu["echo"] / cpu[name],
                                    "p50_delta": lat[name]["p50"] - lat["echo"]["p50"]}
                             for name in ("hit", "hit_redis")}
    if "before" in cpu:
        result["vs_before"] = {"cpu_ratio": cpu["before"] / cpu["tokengate"],
                               "p50_delta": lat["tokengate"]["p50"] - lat["before"]["p50"]}
    if "before_hit" in cpu:
        result["hit_vs_before"] = {"cpu_ratio": cpu["before_hit"] / cpu["hit"],
                                   "p50_delta": lat["hit"]["p50"] - lat["before_hit"]["p50"]}


class Scraper:
    """GETs `/metrics` every `interval` seconds while in use, as Prometheus does (first at
    once). Every answer must be a whole OpenMetrics exposition holding the gRPC families (so
    the per-RPC layer is on); `scrapes` counts them."""

    def __init__(self, addr: str, interval: float = 1.0):
        self.url = f"http://{addr}/metrics"
        self.interval = interval
        self.scrapes = 0
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "Scraper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            try:
                self.scrape()
            except (OSError, ValueError) as e:
                self.problems.append(f"{self.url}: {e}")
            if self._stop.wait(self.interval):
                return

    def scrape(self) -> None:
        request = urllib.request.Request(self.url, headers={"Accept": SCRAPE_ACCEPT})
        with urllib.request.urlopen(request, timeout=5) as reply:
            kind, body = reply.headers.get("content-type", ""), reply.read()
        check_exposition(kind, body)
        self.scrapes += 1

    def verify(self, at_least: int) -> None:
        """Refuses a run whose scrapes failed or were too few to cost what Prometheus costs."""
        if self.problems:
            raise BenchError("; ".join(self.problems[:3]))
        if self.scrapes < at_least:
            raise BenchError(f"{self.url}: {self.scrapes} scrapes, not at least {at_least}")


def check_exposition(content_type: str, body: bytes) -> None:
    """A `/metrics` answer to Prometheus: OpenMetrics, whole, with the gRPC server families."""
    if not content_type.startswith("application/openmetrics-text"):
        raise ValueError(f"content type {content_type!r}, not OpenMetrics")
    if not body.endswith(b"# EOF\n"):
        raise ValueError("an exposition without its closing # EOF")
    if b"\ngrpc_server_handled_total{" not in body:
        raise ValueError("no grpc_server_handled_total series: the per-RPC layer is off")


class MetricsCost(Bench):
    """The same tokengate with metrics off and on (`server.metrics_listen`, which also puts
    the per-RPC layer in place), each answering cache hits and forwarding, in interleaved
    rounds of fresh processes (Bench's round loop: quiet machine, disturbed rounds again).
    While a metrics-on subject is saturated, `/metrics` is scraped every second."""

    def _start(self, before: Path | None) -> None:
        work = self.work
        self.upstream = Server("upstream", [str(BENCH), "upstream"], LOAD_CPU)
        frames = {}
        for client in (PASS_CLIENT, CACHED_CLIENT):
            frames[client] = work / f"metrics-{client}.grpc"
            run([str(BENCH), "frame", str(frames[client]), "--client", client])
        serve = lambda config: [str(TOKENGATE), "serve", "--config", str(config)]  # noqa: E731
        self.specs = {
            "metrics off": (serve(write_config(work / "metrics-off.toml", self.upstream)), ()),
            "metrics on": (serve(write_config(work / "metrics-on.toml", self.upstream,
                                              metrics=True)), ()),
        }
        subjects = []
        for name, client, source, posts in (("tokengate", PASS_CLIENT, "upstream", "one"),
                                            ("hit", CACHED_CLIENT, "cache", "none")):
            subjects += [Subject(name, "metrics off", frames[client], client, source, posts),
                         Subject(f"{name}_metrics", "metrics on", frames[client], client,
                                 source, posts)]
        self.subjects = {s.name: s for s in subjects}
        for name in self.specs:
            self._launch(name)
        if self.live["metrics on"].metrics_addr is None:
            raise BenchError("tokengate with metrics_listen logged no metrics address")
        self._prime()
        self.frame_bytes = {s.name: check(s) for s in subjects}

    @property
    def order(self) -> list[str]:
        return [n for path in METRICS_PATHS for n in (path, f"{path}_metrics")]

    def one_round(self, order: list[str], r: int) -> tuple[dict, dict[str, list[int]]]:
        """Warm-up, then each subject's CPU per call at saturation, in a rotating order."""
        for subject in self.subjects.values():
            self.grpc(subject, [f"-D{self.s.warmup_s}", "-c4", "-m32"])
        result: dict = {"saturation": {}, "foreign_cores": {}}
        k = r % len(order)
        for name in order[k:] + order[:k]:
            subject = self.subjects[name]
            if subject.server.metrics_addr is None:
                sat = self.saturate(subject)
            else:
                with Scraper(subject.server.metrics_addr) as scraper:
                    sat = self.saturate(subject)
                scraper.verify(at_least=max(1, self.s.saturation_s))
                sat["scrapes"] = scraper.scrapes
            result["saturation"][name] = sat
            result["foreign_cores"][f"{name}_saturation"] = sat["foreign_cores"]
        derive_metrics(result)
        return result, {}

    def measure(self) -> dict:
        rounds, discarded, _ = self.rounds()
        return {"rounds": rounds, "discarded_rounds": discarded,
                "waited_for_quiet_s": self.waited_s}


def derive_metrics(result: dict) -> None:
    """A round's cost of metrics per path: CPU per call with them over without, less one."""
    cpu = {name: x["cpu_us_per_call"] for name, x in result["saturation"].items()}
    result["metrics_cost"] = {path: cpu[f"{path}_metrics"] / cpu[path] - 1
                              for path in METRICS_PATHS}


def metrics_rows(m: dict) -> list[tuple[str, str, str, str]]:
    """The table's rows for what metrics cost (`m`: MetricsCost.measure's result)."""
    rounds = m["rounds"]
    cost = lambda path: [100 * r["metrics_cost"][path] for r in rounds]  # noqa: E731
    cpu = lambda name: spread([r["saturation"][name]["cpu_us_per_call"]  # noqa: E731
                               for r in rounds])
    scrapes = sum(x.get("scrapes", 0) for r in rounds for x in r["saturation"].values())
    target = f"≤ +{100 * METRICS_BUDGET:g} %"
    # (the tolerance only keeps float noise off the boundary: 20.6 / 20 − 1 > 0.03)
    met = lambda path: median(cost(path)) <= 100 * METRICS_BUDGET + 1e-9  # noqa: E731
    return [
        (f"**Metrics on** (`server.metrics_listen` set, `/metrics` scraped every second: "
         f"{scrapes} scrapes): CPU per call over metrics off, cache hit (on / off: "
         f"{cpu('hit_metrics')} / {cpu('hit')} µs)", spread(cost("hit"), "{:+.1f}") + " %",
         target, verdict(met("hit"))),
        (f"… forwarding (on / off: {cpu('tokengate_metrics')} / {cpu('tokengate')} µs)",
         spread(cost("tokengate"), "{:+.1f}") + " %", target, verdict(met("tokengate"))),
    ]


def metrics_table(results: dict) -> str:
    """results.md of `--only metrics`: the cost of metrics alone."""
    m, env, s = results["metrics"], results["environment"], results["settings"]
    rows = metrics_rows(m)
    lines = ["| figure | measured: median (min–max) | target | |", "|---|---|---|---|",
             *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows], "",
             f"{len(m['rounds'])} interleaved round(s) of fresh processes; saturation "
             f"{s['saturation_s']} s at 4 connections × 32 streams per subject. tokengate "
             f"{env['commit']}, {env['date']}; {env['cpu']}, {env['nproc']} CPUs; load average "
             f"{env.get('load_before', 'n/a')} at the start. {disturbance(m['rounds'])}"
             f"{set_aside(m['discarded_rounds'], m['waited_for_quiet_s'])}"]
    if results.get("smoke"):
        lines.insert(0, "**Smoke run: too short to mean anything; it only shows the harness "
                        "works.**\n")
    return "\n".join(lines) + "\n"


def core_busy(since: dict | None = None) -> dict:
    """Per-core busy share since `since` (a previous raw reading), or a raw reading."""
    raw = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if m := re.match(r"cpu(\d+) (.*)", line):
            v = [int(x) for x in m.group(2).split()]
            raw[int(m.group(1))] = (sum(v) - v[3] - v[4], sum(v))  # busy = all but idle, iowait
    if since is None:
        return raw
    return {cpu: (b - since[cpu][0]) / max(1, t - since[cpu][1]) for cpu, (b, t) in raw.items()}


def inflight(settings: Settings, work: Path, max_connections: int | None) -> dict:
    """RSS with 1,000 calls in flight: a slow upstream holds every call inside tokengate.
    `max_connections` None keeps tokengate's default (so most calls wait for a connection);
    1000 lets every call have its own upstream connection at once. The calls are the
    pass-through client's: identical cached calls would share one upstream call."""
    upstream = Server("slow upstream", [str(BENCH), "upstream", "--delay", settings.inflight_delay],
                      LOAD_CPU)
    config = write_config(work / "inflight.toml", upstream, max_connections=max_connections)
    tokengate = Server("tokengate", [str(TOKENGATE), "serve", "--config", str(config)], SUT_CPU)
    try:
        frame = work / f"{PASS_CLIENT}.grpc"
        subject = Subject("tokengate", "tokengate", frame, PASS_CLIENT, "upstream", "one",
                          server=tokengate)
        min_frame = check(subject) - 16
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, tokengate.status("VmRSS"))
                stop.wait(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            out = run(["h2load", "-t1", "-c10", "-m100", f"-D{settings.inflight_s}",
                       *GRPC_HEADERS, "-d", str(frame), f"http://{tokengate.addr}{METHOD}"],
                      cpu=LOAD_CPU)
        finally:
            stop.set()
            sampler.join()
        load = parse_h2load(out)
        verify(load, tokengate.addr or "", min_frame)
        # h2load keeps 10 × 100 streams open; those cut off by -D prove they were in flight.
        started = int(re.search(r"(\d+) started", out).group(1))
        if started - load.done != 1000:
            raise BenchError(f"{started - load.done} calls in flight at the end, not 1,000")
        # Read before the next check: calls cut off by h2load's exit give their connections
        # back while the upstream still sleeps on them.
        most = upstream_stats(upstream)["max_in_flight"]
        check(subject)
        return {"calls": load.done, "max_in_flight_upstream": most, "rss_peak_kib": peak,
                "hwm_kib": tokengate.status("VmHWM"), "max_connections": max_connections}
    finally:
        tokengate.stop()
        upstream.stop()


def startup(settings: Settings, work: Path) -> dict:
    """exec → SERVING, timed by tokengate-bench (pinned child, polling health every 1 ms)."""
    upstream = Server("upstream", [str(BENCH), "upstream"], LOAD_CPU)
    try:
        config = write_config(work / "startup.toml", upstream)
        out = {}
        for name, argv in (("tokengate", [str(TOKENGATE), "serve", "--config", str(config)]),
                           ("echo", [str(BENCH), "echo"])):
            text = run([str(BENCH), "startup", "--cpu", str(SUT_CPU), "--home-cpu", str(LOAD_CPU),
                        "--runs", str(settings.startup_runs), "--", *argv], cpu=LOAD_CPU)
            out[name] = [float(x) for x in text.split()]
        return out
    finally:
        upstream.stop()


# ---------------------------------------------------------------------------------------------
# Report


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """`median (min–max)`."""
    return (f"{fmt.format(statistics.median(values))} "
            f"({fmt.format(min(values))}–{fmt.format(max(values))})")


def source_commit() -> str:
    """The commit the binaries are built from, `+dirty` when the product's sources differ from
    it (read at the start: a commit made during a long run does not relabel it)."""
    git = ["git", "--no-optional-locks", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "src", "proto", "build.rs",
                            "Cargo.toml", "Cargo.lock"], capture_output=True, text=True).stdout
    return (commit or "unknown") + ("+dirty" if dirty.strip() else "")


def environment() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               "unknown")
    governor = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "kernel": platform.release(), "cpu": cpu, "nproc": os.cpu_count(),
            "governor": governor.read_text().strip() if governor.exists() else "n/a",
            "h2load": run(["h2load", "--version"]).split("\n")[0]}


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(results: dict) -> str:
    rounds = results["rounds"]
    env, s = results["environment"], results["settings"]
    col = lambda f: [f(r) for r in rounds]  # noqa: E731
    cpu = lambda who: col(lambda r: r["saturation"][who]["cpu_us_per_call"])  # noqa: E731
    rps = lambda who: spread(col(lambda r: r["saturation"][who]["rps"]), "{:.0f}")  # noqa: E731
    lat = lambda who, p: col(lambda r: r["latency"][who][p])  # noqa: E731
    added = lambda p: col(lambda r: r["added"][p])  # noqa: E731
    ratio = col(lambda r: r["cpu_ratio"])
    fwd_cpu = col(lambda r: r["vs_translator"]["cpu_ratio"])
    fwd_p50 = col(lambda r: r["vs_translator"]["p50_delta"])
    hit = lambda who, k: col(lambda r: r["hit_vs_echo"][who][k])  # noqa: E731
    half = results["half"]
    rss = results["rss"]
    inf = results["inflight"]
    unc = results["inflight_uncapped"]
    st = results["startup"]
    mib = lambda kib: f"{kib / 1024:.1f}"  # noqa: E731
    commands, hits = redis_per_hit(rounds)
    per_1000_hits = commands * 1000 / hits if hits else float("nan")

    rows = [
        ("**Forwarding** (a client with `cache = false`): throughput per core vs the minimal "
         "translator (translator CPU/call ÷ tokengate CPU/call)",
         spread(fwd_cpu, "{:.2f}") + "×", "≥ 0.9×", verdict(median(fwd_cpu) >= 0.9)),
        ("… p50 over the translator's, one call at a time (µs)", spread(fwd_p50, "{:+.1f}"),
         "≤ +15", verdict(median(fwd_p50) <= 15)),
        ("… CPU per call at saturation, tokengate / translator / echo (µs)",
         f"{spread(cpu('tokengate'))} / {spread(cpu('translator'))} / {spread(cpu('echo'))}",
         "", ""),
        ("… req/s at saturation, tokengate / translator / echo (second core shared)",
         f"{rps('tokengate')} / {rps('translator')} / {rps('echo')}", "", ""),
    ]
    if all("vs_before" in r for r in rounds):
        b_cpu = col(lambda r: r["vs_before"]["cpu_ratio"])
        b_p50 = col(lambda r: r["vs_before"]["p50_delta"])
        rows += [
            (f"… the broker on a pass-through call: CPU/call before it ÷ with it (tokengate "
             f"{results.get('before_rev', 'before the broker')}; CPU per call "
             f"{spread(cpu('before'))} µs)", spread(b_cpu, "{:.2f}") + "×",
             "≥ 0.97× (nothing measurable)", verdict(median(b_cpu) >= 0.97)),
            ("… p50 with the broker over p50 before it (µs)", spread(b_p50, "{:+.1f}"),
             "≤ +5 (nothing measurable)", verdict(median(b_p50) <= 5)),
        ]
    else:
        rows.append(("… the broker on a pass-through call, against tokengate built from before "
                     "it", "not measured (bench/run --before REV)", "nothing measurable", ""))
    if all("hit_vs_before" in r for r in rounds):
        h_cpu = col(lambda r: r["hit_vs_before"]["cpu_ratio"])
        h_p50 = col(lambda r: r["hit_vs_before"]["p50_delta"])
        rows += [
            (f"… a cache hit: CPU/call of tokengate {results.get('before_rev', 'before')} ÷ "
             f"today's ({spread(cpu('before_hit'))} / {spread(cpu('hit'))} µs)",
             spread(h_cpu, "{:.2f}") + "×", "≥ 0.97× (no worse)", verdict(median(h_cpu) >= 0.97)),
            ("… a cache hit's p50 today over before (µs)", spread(h_p50, "{:+.1f}"),
             "≤ +5 (no worse)", verdict(median(h_p50) <= 5)),
        ]
    rows += [
        ("… throughput per core vs echo (echo CPU/call ÷ tokengate CPU/call)",
         spread(ratio, "{:.2f}") + "×", "≥ 0.6×", verdict(median(ratio) >= 0.6)),
        ("… added latency p50 (tokengate − echo − direct call), one call at a time (µs)",
         spread(added("p50")), "≤ 60", verdict(median(added("p50")) <= 60)),
        ("… added latency p99, one call at a time (µs)", spread(added("p99")), "≤ 250",
         verdict(median(added("p99")) <= 250)),
        ("… p50 tokengate / translator / echo / direct call (µs)",
         f"{spread(lat('tokengate', 'p50'))} / {spread(lat('translator', 'p50'))} / "
         f"{spread(lat('echo', 'p50'))} / {spread(lat('direct', 'p50'))}", "", ""),
        ("… p99 tokengate / translator / echo / direct call (µs)",
         f"{spread(lat('tokengate', 'p99'))} / {spread(lat('translator', 'p99'))} / "
         f"{spread(lat('echo', 'p99'))} / {spread(lat('direct', 'p99'))}", "", ""),
        (f"… p99 at half saturation, tokengate at {half['tokengate']['rps']:.0f} req/s "
         f"(echo at {half['echo']['rps']:.0f}) (µs)",
         f"{half['tokengate']['p99']:.0f} (echo {half['echo']['p99']:.0f}; "
         f"p50 {half['tokengate']['p50']:.0f})", "", ""),
        ("**Cache hit**, memory backend: throughput per core vs echo (echo CPU/call ÷ hit "
         "CPU/call)", spread(hit("hit", "cpu_ratio"), "{:.2f}") + "×", "≥ 0.8×",
         verdict(median(hit("hit", "cpu_ratio")) >= 0.8)),
        ("… with the Redis backend (local layer fresh)",
         spread(hit("hit_redis", "cpu_ratio"), "{:.2f}") + "×", "≥ 0.8×",
         verdict(median(hit("hit_redis", "cpu_ratio")) >= 0.8)),
        ("… CPU per call at saturation, hit / hit with Redis / echo (µs)",
         f"{spread(cpu('hit'))} / {spread(cpu('hit_redis'))} / {spread(cpu('echo'))}", "", ""),
        ("… req/s at saturation, hit / hit with Redis / echo (second core shared)",
         f"{rps('hit')} / {rps('hit_redis')} / {rps('echo')}", "", ""),
        ("… p50 one call at a time, hit / hit with Redis / echo (µs)",
         f"{spread(lat('hit', 'p50'))} / {spread(lat('hit_redis', 'p50'))} / "
         f"{spread(lat('echo', 'p50'))}", "", ""),
        ("… p50 over the echo's, hit / hit with Redis (µs)",
         f"{spread(hit('hit', 'p50_delta'), '{:+.1f}')} / "
         f"{spread(hit('hit_redis', 'p50_delta'), '{:+.1f}')}", "", ""),
        (f"… Redis commands per 1,000 hits with Redis behind (health-check PINGs aside; "
         f"{commands} in {hits:,} hits)", f"{per_1000_hits:.3g}", "0",
         verdict(commands == 0 and hits > 0)),
        ("**Memory**: RSS idle (MiB)", f"{mib(rss['tokengate_idle_kib'])}, of which heap and "
         f"stacks {mib(rss['tokengate_idle_anon_kib'])} (echo {mib(rss['echo_idle_kib'])}; "
         f"after a round of load {mib(rss['tokengate_after_load_kib'])})",
         "≤ 8", verdict(rss["tokengate_idle_kib"] <= 8 * 1024)),
        (f"… with 1,000 calls in flight (MiB; default max_connections, so the upstream had "
         f"{inf['max_in_flight_upstream']} at once)", mib(inf["rss_peak_kib"]), "≤ 40",
         verdict(inf["rss_peak_kib"] <= 40 * 1024)),
        (f"… with max_connections = 1000 (the upstream had {unc['max_in_flight_upstream']} at "
         f"once) (MiB)", mib(unc["rss_peak_kib"]), "", ""),
    ]
    if fill := results.get("broker", {}).get("fill"):
        rows.append((
            f"… with {fill['entries']:,} cached entries (distinct client_credentials accounts, "
            f"~1 KB token pair each; {fill['hits_on_reread']:,} hits on re-reading them all) "
            f"(MiB)", f"{mib(fill['rss_kib'])}, of which heap {mib(fill['anon_kib'])}: "
            f"{fill['bytes_per_entry'] / 1024:.2f} KiB per entry over idle "
            f"{mib(fill['idle_kib'])}", "", "" if fill["met"] else
            "**invalid**: " + "; ".join(fill["problems"])))
    if "metrics" in results:
        rows += metrics_rows(results["metrics"])
    rows.append(("exec → SERVING (ms)", f"{spread(st['tokengate'], '{:.1f}')} (echo "
                 f"{spread(st['echo'], '{:.1f}')})", "≤ 20",
                 verdict(median(st["tokengate"]) <= 20)))
    aside = set_aside(results.get("discarded_rounds", []), results.get("waited_for_quiet_s", 0))
    lines = [
        "| figure | measured: median (min–max) | target | |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        f"{s['rounds']} interleaved rounds; saturation {s['saturation_s']} s at 4 connections × "
        f"32 streams; {s['latency_calls']} sequential calls per latency run. "
        f"tokengate {env['commit']}, {env['date']}; {env['cpu']}, {env['nproc']} CPUs, kernel "
        f"{env['kernel']}, governor {env['governor']}; {env['h2load']}; load average "
        f"{env.get('load_before', 'n/a')} at the start. System under test on CPU {SUT_CPU}; "
        f"h2load, the upstream and Redis on CPU {LOAD_CPU}; tokengate ran "
        f"{rss['tokengate_threads']} threads. {disturbance(rounds)}{aside}",
    ]
    if m := results.get("metrics"):
        lines[-1] += (f" What metrics cost was measured in {len(m['rounds'])} rounds of its own "
                      f"(the same tokengate with and without `metrics_listen`, fresh processes "
                      f"each round). {disturbance(m['rounds'])}"
                      f"{set_aside(m['discarded_rounds'], m['waited_for_quiet_s'])}")
    if "broker" in results:
        lines += ["", "Upstream POSTs per 1,000 client calls (the token broker):", "",
                  broker.table(results["broker"]).rstrip("\n")]
    if results.get("smoke"):
        lines.insert(0, "**Smoke run: too short to mean anything; it only shows the harness "
                        "works.**\n")
    return "\n".join(lines) + "\n"


def disturbance(rounds: list[dict]) -> str:
    """How much other processes ran during the timed runs, in words."""
    values = [v for r in rounds for v in r.get("foreign_cores", {}).values()]
    if not values:
        return ""
    disturbed = sum(v > DISTURBED_CORES for v in values)
    return (f"Other processes on the machine used {median(values):.2f} of a core (median; at "
            f"most {max(values):.2f}) during the timed runs; {disturbed} of {len(values)} runs "
            f"were above {DISTURBED_CORES} of a core.")


def set_aside(discarded: list[dict], waited_s: float = 0) -> str:
    waited = (f" The harness waited {waited_s / 60:.0f} min in all for other processes to go "
              f"quiet before rounds." if waited_s >= 60 else "")
    if not discarded:
        return waited
    worst = max(max(r["foreign_cores"].values()) for r in discarded)
    return (f" {len(discarded)} more round(s) were set aside and run again because other "
            f"processes used up to {worst:.2f} of a core during them.{waited}")


def redis_per_hit(rounds: list[dict]) -> tuple[int, int]:
    """Redis commands (PINGs aside) and hits, summed over every hit run with Redis behind."""
    commands = hits = 0
    for r in rounds:
        for n, calls in r.get("redis_commands", {}).values():
            commands += n
            hits += calls
    return commands, hits


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p / 10 for p in range(0, 1000)] + [99.9, 99.99]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name, values in results["pooled_latency_us"].items():
        ordered = sorted(values)
        ys = [ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] for p in points]
        ax.plot(points, ys, label=LABELS[name])
    ax.set_yscale("log")
    ax.set_xlabel("percentile (one call at a time)")
    ax.set_ylabel("latency (µs, log scale)")
    ax.set_title(f"tokengate {results['environment']['commit']}: latency per call, "
                 f"{results['settings']['rounds']} rounds pooled")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a short run that checks the harness works; its numbers mean nothing")
    parser.add_argument("--out", type=Path, help="where the table, plot and JSON go "
                        "(default bench/results, or target/bench-smoke with --smoke)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, and 10 for "
                        "what metrics cost)")
    parser.add_argument("--before", type=Path, metavar="BINARY",
                        help="tokengate built from before the broker: its forwarding path is "
                        "measured beside today's (bench/run --before REV builds it)")
    parser.add_argument("--before-rev", help="the revision --before was built from (reported)")
    parser.add_argument("--skip-broker", action="store_true",
                        help="leave out the broker's POST counts and the 100,000-entry fill")
    parser.add_argument("--only", choices=["metrics"],
                        help="measure only this: `metrics`, what metrics cost per call")
    parser.add_argument("--quiet-wait", type=int, metavar="SECONDS",
                        help="longest wait in all for a quiet machine before rounds "
                        "(default 1800; 0 on a machine that is never quiet)")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: write results.md again from a results.json")
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.render.read_text())
        md = metrics_table(results) if results.get("only") == "metrics" else table(results)
        (args.render.parent / "results.md").write_text(md)
        print(md)
        return 0
    settings = Settings.smoke() if args.smoke else Settings()
    broker_settings = broker.BrokerSettings.smoke() if args.smoke else broker.BrokerSettings()
    if args.rounds:
        settings.rounds = settings.metrics_rounds = args.rounds
    if args.quiet_wait is not None:
        settings.quiet_wait_s = args.quiet_wait
    default_out = "target/bench-smoke" if args.smoke else "bench/results"
    if args.only:
        default_out = f"target/bench-{args.only}" + ("-smoke" if args.smoke else "")
    out = args.out or ROOT / default_out
    if len(os.sched_getaffinity(0)) < 2 or not {SUT_CPU, LOAD_CPU} <= os.sched_getaffinity(0):
        print(f"bench: needs CPUs {LOAD_CPU} and {SUT_CPU}", file=sys.stderr)
        return 2
    for binary in (TOKENGATE, BENCH, *([args.before] if args.before else [])):
        if not binary.exists():
            print(f"bench: {binary} is missing; run bench/run", file=sys.stderr)
            return 2
    os.sched_setaffinity(0, {LOAD_CPU})  # the harness itself stays off the measured core
    foreign = Foreign()
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    commit = source_commit()

    if args.only == "metrics":
        return only_metrics(settings, foreign, out, args.smoke, commit, load_before)

    with tempfile.TemporaryDirectory(prefix="tokengate-bench-") as tmp:
        work = Path(tmp)
        try:
            bench = Bench(settings, work, args.before, foreign)
            try:
                results = bench.measure()
            finally:
                bench.close()
            results["inflight"] = inflight(settings, work, None)
            results["inflight_uncapped"] = inflight(settings, work, 1000)
            print(f"in flight: {json.dumps(results['inflight'])}; with max_connections = 1000: "
                  f"{json.dumps(results['inflight_uncapped'])}", flush=True)
            results["startup"] = startup(settings, work)
            print(f"startup ms: {json.dumps(results['startup'])}", flush=True)
            results["metrics"] = measure_metrics(settings, work, foreign)
            if not args.skip_broker:
                # The harness is pinned to CPU 0; the broker scenarios use both cores.
                os.sched_setaffinity(0, {LOAD_CPU, SUT_CPU})
                results["broker"] = broker.measure(broker_settings, work)
        except BenchError as e:
            print(f"bench: {e}", file=sys.stderr)
            return 1
    results["settings"] = settings.__dict__
    results["environment"] = {**environment(), "commit": commit, "load_before": load_before}
    results["smoke"] = args.smoke
    if args.before_rev:
        results["before_rev"] = args.before_rev
    out.mkdir(parents=True, exist_ok=True)
    md = table(results)
    (out / "results.md").write_text(md)
    plot(results, out / "latency.png")
    pooled = results.pop("pooled_latency_us")
    results["pooled_calls"] = {k: len(v) for k, v in pooled.items()}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(md)
    print(f"wrote {out / 'results.md'}, {out / 'latency.png'} and {out / 'results.json'}")
    return 0


def measure_metrics(settings: Settings, work: Path, foreign: Foreign | None) -> dict:
    """MetricsCost's `metrics_rounds` rounds, on processes of its own."""
    cost = MetricsCost(dataclasses.replace(settings, rounds=settings.metrics_rounds), work, None,
                       foreign)
    try:
        m = cost.measure()
    finally:
        cost.close()
    print(f"metrics cost: {json.dumps([r['metrics_cost'] for r in m['rounds']])}", flush=True)
    return m


def only_metrics(settings: Settings, foreign: Foreign, out: Path, smoke: bool, commit: str,
                 load_before: str) -> int:
    """`--only metrics`: what metrics cost, and nothing else, into `out`."""
    with tempfile.TemporaryDirectory(prefix="tokengate-bench-") as tmp:
        try:
            m = measure_metrics(settings, Path(tmp), foreign)
        except BenchError as e:
            print(f"bench: {e}", file=sys.stderr)
            return 1
    results = {"only": "metrics", "metrics": m, "settings": settings.__dict__, "smoke": smoke,
               "environment": {**environment(), "commit": commit, "load_before": load_before}}
    out.mkdir(parents=True, exist_ok=True)
    md = metrics_table(results)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(md)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
