#!/usr/bin/env python3
"""tokengate's benchmark: tokengate against a tonic echo and a direct call, as same-run ratios.

Run through bench/run, which builds the release binaries and this script's venv first.
Placement (../shared/reference/performance.md §6): the system under test (tokengate or the
echo) is pinned to SUT_CPU; h2load and the mock upstream share LOAD_CPU. The direct call to the
upstream is made from SUT_CPU, so it crosses cores as tokengate's own upstream call does.

h2load cannot read grpc-status, so every run is checked: a real GetToken before and after it,
no failed stream, a DATA byte count that only successful answers reach (an error is
trailers-only), and, for tokengate, one upstream POST per call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
TOKENGATE = RELEASE / "tokengate"
BENCH = RELEASE / "tokengate-bench"
METHOD = "/tokengate.v1.TokenService/GetToken"
GRPC_HEADERS = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
CLIENT_SECRET = "bench-secret-0123456789abcdef"
SUT_CPU, LOAD_CPU = 1, 0
HALF_RATE_CONNECTIONS = 16
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Settings:
    """How long and how often; `--smoke` shrinks everything to check that the harness works."""

    rounds: int = 5
    warmup_s: int = 3
    saturation_s: int = 10
    latency_calls: int = 20_000
    half_rate_s: int = 10
    inflight_s: int = 5
    inflight_delay: str = "200ms"
    startup_runs: int = 20

    @classmethod
    def smoke(cls) -> "Settings":
        return cls(rounds=1, warmup_s=1, saturation_s=1, latency_calls=300, half_rate_s=1,
                   inflight_s=2, startup_runs=3)


class BenchError(RuntimeError):
    """A run that did not measure what it claims to; the harness stops on it."""


# ---------------------------------------------------------------------------------------------
# Processes


class Server:
    """A pinned child process whose stdout is drained (tokengate logs every call to stdout, and a
    full pipe would stall it) and searched for the address it listens on."""

    def __init__(self, name: str, argv: list[str], cpu: int):
        self.name = name
        self.proc = subprocess.Popen(["taskset", "-c", str(cpu), *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.addr: str | None = None
        self._seen = threading.Event()
        self._head: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._seen.wait(15) or self.addr is None:
            self.stop()
            raise BenchError(f"{name} did not start: {' '.join(self._head)[-2000:]}")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        pending = b""
        while chunk := os.read(self.proc.stdout.fileno(), 1 << 16):
            if self.addr is None:
                pending += chunk
                text = pending.decode(errors="replace")
                self._head.append(text)
                if m := re.search(r"127\.0\.0\.1:(\d+)", text):
                    self.addr = f"127.0.0.1:{m.group(1)}"
                    self._seen.set()
        self._seen.set()

    @property
    def pid(self) -> int:
        return self.proc.pid  # taskset execs the command, so this is the server itself

    def cpu_ticks(self) -> int:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, all threads

    def status(self, key: str) -> int:
        """A /proc/PID/status figure in KiB (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise BenchError(f"no {key} for {self.name}")

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run(argv: list[str], cpu: int | None = None, **kwargs) -> str:
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(map(str, argv))} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def check(server: Server) -> int:
    """One real GetToken; returns the response frame size."""
    return int(run([str(BENCH), "check", "--addr", f"http://{server.addr}"], cpu=LOAD_CPU))


def fetch(url: str, method: str = "GET") -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
        return r.read()


def upstream_stats(upstream: Server) -> dict:
    return json.loads(fetch(f"http://{upstream.addr}/stats"))


def write_config(path: Path, upstream: Server, max_connections: int | None = None) -> Path:
    limit = "" if max_connections is None else f"max_connections = {max_connections}\n"
    path.write_text(f"""\
[server]
listen = "127.0.0.1:0"

[upstream]
base_url = "http://{upstream.addr}"
allow_insecure_http = true
{limit}
[[clients.registered]]
client_id = "bench-app"
client_secret = "{CLIENT_SECRET}"
default = true
""")
    return path


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
    latencies_us: list[int] = field(default_factory=list)


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
    def __init__(self, settings: Settings, work: Path):
        self.s = settings
        self.work = work
        self.frame = work / "request.grpc"
        run([str(BENCH), "frame", str(self.frame)])
        self.upstream = Server("upstream", [str(BENCH), "upstream"], LOAD_CPU)
        self.config = write_config(work / "tokengate.toml", self.upstream)
        self.tokengate = Server("tokengate", [str(TOKENGATE), "serve", "--config", str(self.config)],
                                SUT_CPU)
        self.rss_idle_kib = self.tokengate.status("VmRSS")
        self.rss_idle_anon_kib = self.tokengate.status("RssAnon")
        self.echo = Server("echo", [str(BENCH), "echo"], SUT_CPU)
        self.echo_rss_idle_kib = self.echo.status("VmRSS")
        self.frame_bytes = {s.name: check(s) for s in (self.tokengate, self.echo)}
        # The direct call replays, byte for byte, the POST tokengate just made.
        first = json.loads(fetch(f"http://{self.upstream.addr}/first-request"))
        self.direct_body = work / "direct.form"
        self.direct_body.write_text(first["body"])
        self.direct_url = f"http://{self.upstream.addr}{first['path']}"
        self.direct_headers = ["-H", f"content-type: {first['content_type']}",
                               "-H", f"authorization: {first['authorization']}"]
        self.token_bytes = len(fetch(self.direct_url, "POST"))

    def close(self) -> None:
        for server in (self.tokengate, self.echo, self.upstream):
            server.stop()

    # One call of each kind of run --------------------------------------------------------------

    def grpc(self, server: Server, args: list[str], log: Path | None = None) -> Load:
        """An h2load run against a gRPC server, checked before, during and after."""
        check(server)
        posts = upstream_stats(self.upstream)["posts"]
        load = h2load(f"http://{server.addr}{METHOD}", LOAD_CPU, args, GRPC_HEADERS, self.frame,
                      self.frame_bytes[server.name] - 16, log)
        if server is self.tokengate:
            sent = upstream_stats(self.upstream)["posts"] - posts
            if sent < load.done:
                raise BenchError(f"{load.done} calls but only {sent} upstream POSTs")
        check(server)
        return load

    def direct(self, args: list[str], log: Path) -> Load:
        return h2load(self.direct_url, SUT_CPU, ["--h1", *args], self.direct_headers,
                      self.direct_body, self.token_bytes, log)

    def saturate(self, server: Server) -> dict:
        """Closed-loop saturation: req/s, and the server's CPU per call from /proc."""
        busy0 = core_busy()
        ticks = server.cpu_ticks()
        load = self.grpc(server, ["-c4", "-m32", f"-D{self.s.saturation_s}"])
        ticks = server.cpu_ticks() - ticks
        busy = core_busy(busy0)
        return {"rps": load.rps, "calls": load.done,
                "cpu_us_per_call": ticks / TICKS * 1e6 / load.done,
                "sut_core_busy": busy[SUT_CPU], "load_core_busy": busy[LOAD_CPU]}

    def latency(self, which: str, log: Path) -> list[int]:
        args = ["-c1", "-m1", f"-n{self.s.latency_calls}"]
        if which == "direct":
            return self.direct(args, log).latencies_us
        return self.grpc(getattr(self, which), args, log).latencies_us

    # The whole benchmark ----------------------------------------------------------------------

    def measure(self) -> dict:
        s = self.s
        warm = [f"-D{s.warmup_s}", "-c4", "-m32"]
        self.grpc(self.echo, warm)
        self.grpc(self.tokengate, warm)
        self.direct(warm, self.work / "warm.log")

        order = ["echo", "tokengate", "direct"]
        rounds = []
        pooled: dict[str, list[int]] = {name: [] for name in order}
        for r in range(s.rounds):
            result = {"latency": {}, "saturation": {}}
            for name in order[r % 3:] + order[:r % 3]:  # rotate so drift spreads evenly
                lat = self.latency(name, self.work / f"{name}-{r}.log")
                pooled[name] += lat
                result["latency"][name] = {"p50": percentile(lat, 50), "p99": percentile(lat, 99)}
                if name != "direct":
                    result["saturation"][name] = self.saturate(getattr(self, name))
            lat = result["latency"]
            result["added"] = {p: lat["tokengate"][p] - lat["echo"][p] - lat["direct"][p]
                               for p in ("p50", "p99")}
            sat = result["saturation"]
            result["cpu_ratio"] = (sat["echo"]["cpu_us_per_call"]
                                   / sat["tokengate"]["cpu_us_per_call"])
            rounds.append(result)
            print(f"round {r + 1}/{s.rounds}: {json.dumps(result)}", flush=True)

        half = {}
        for name in ("tokengate", "echo"):
            rate = statistics.median(x["saturation"][name]["rps"] for x in rounds) / 2
            # One stream per connection: h2load's rate timer sends a connection's streams in
            # bursts, which would measure its own queueing rather than the server's.
            per_conn = max(1, round(rate / HALF_RATE_CONNECTIONS))
            load = self.grpc(getattr(self, name),
                             [f"-c{HALF_RATE_CONNECTIONS}", "-m1", f"--rps={per_conn}",
                              f"-D{s.half_rate_s}"],
                             self.work / f"half-{name}.log")
            half[name] = {"target_rps": per_conn * HALF_RATE_CONNECTIONS, "rps": load.rps,
                          "p50": percentile(load.latencies_us, 50),
                          "p99": percentile(load.latencies_us, 99)}
        print(f"half saturation: {json.dumps(half)}", flush=True)

        rss_after_kib = self.tokengate.status("VmRSS")
        return {"rounds": rounds, "half": half, "pooled_latency_us": pooled,
                "rss": {"tokengate_idle_kib": self.rss_idle_kib,
                        "tokengate_idle_anon_kib": self.rss_idle_anon_kib,
                        "tokengate_after_load_kib": rss_after_kib,
                        "echo_idle_kib": self.echo_rss_idle_kib,
                        "tokengate_threads": self.tokengate.threads()}}


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
    1000 lets every call have its own upstream connection at once."""
    upstream = Server("slow upstream", [str(BENCH), "upstream", "--delay", settings.inflight_delay],
                      LOAD_CPU)
    config = write_config(work / "inflight.toml", upstream, max_connections)
    tokengate = Server("tokengate", [str(TOKENGATE), "serve", "--config", str(config)], SUT_CPU)
    try:
        frame = work / "request.grpc"
        min_frame = check(tokengate) - 16
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
        check(tokengate)
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


def environment() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               "unknown")
    governor = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "kernel": platform.release(), "cpu": cpu, "nproc": os.cpu_count(),
            "governor": governor.read_text().strip() if governor.exists() else "n/a",
            "commit": commit or "unknown",
            "h2load": run(["h2load", "--version"]).split("\n")[0]}


def table(results: dict) -> str:
    rounds = results["rounds"]
    env, s = results["environment"], results["settings"]
    col = lambda f: [f(r) for r in rounds]  # noqa: E731
    t_cpu = col(lambda r: r["saturation"]["tokengate"]["cpu_us_per_call"])
    e_cpu = col(lambda r: r["saturation"]["echo"]["cpu_us_per_call"])
    ratio = col(lambda r: r["cpu_ratio"])
    lat = lambda who, p: col(lambda r: r["latency"][who][p])  # noqa: E731
    added = lambda p: col(lambda r: r["added"][p])  # noqa: E731
    half = results["half"]
    rss = results["rss"]
    inf = results["inflight"]
    unc = results["inflight_uncapped"]
    st = results["startup"]
    mib = lambda kib: f"{kib / 1024:.1f}"  # noqa: E731

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    rows = [
        ("Throughput per core vs echo (echo CPU/call ÷ tokengate CPU/call)",
         spread(ratio, "{:.2f}") + "×", "≥ 0.6×", verdict(statistics.median(ratio) >= 0.6)),
        ("CPU per call at saturation, tokengate / echo (µs)",
         f"{spread(t_cpu)} / {spread(e_cpu)}", "", ""),
        ("req/s at saturation, tokengate / echo (second core shared)",
         f"{spread(col(lambda r: r['saturation']['tokengate']['rps']), '{:.0f}')} / "
         f"{spread(col(lambda r: r['saturation']['echo']['rps']), '{:.0f}')}", "", ""),
        ("Added latency p50, one call at a time (µs)", spread(added("p50")), "≤ 60",
         verdict(statistics.median(added("p50")) <= 60)),
        ("Added latency p99, one call at a time (µs)", spread(added("p99")), "≤ 250",
         verdict(statistics.median(added("p99")) <= 250)),
        ("… from p50 tokengate / echo / direct call (µs)",
         f"{spread(lat('tokengate', 'p50'))} / {spread(lat('echo', 'p50'))} / "
         f"{spread(lat('direct', 'p50'))}", "", ""),
        ("… from p99 tokengate / echo / direct call (µs)",
         f"{spread(lat('tokengate', 'p99'))} / {spread(lat('echo', 'p99'))} / "
         f"{spread(lat('direct', 'p99'))}", "", ""),
        (f"p99 at half saturation, tokengate at {half['tokengate']['rps']:.0f} req/s "
         f"(echo at {half['echo']['rps']:.0f}) (µs)",
         f"{half['tokengate']['p99']:.0f} (echo {half['echo']['p99']:.0f}; "
         f"p50 {half['tokengate']['p50']:.0f})", "", ""),
        ("RSS idle (MiB)", f"{mib(rss['tokengate_idle_kib'])}, of which heap and stacks "
         f"{mib(rss['tokengate_idle_anon_kib'])} (echo "
         f"{mib(rss['echo_idle_kib'])}; after the load {mib(rss['tokengate_after_load_kib'])})",
         "≤ 8", verdict(rss["tokengate_idle_kib"] <= 8 * 1024)),
        (f"RSS with 1,000 calls in flight (MiB; default max_connections, so the upstream had "
         f"{inf['max_in_flight_upstream']} at once)", mib(inf["rss_peak_kib"]), "≤ 40",
         verdict(inf["rss_peak_kib"] <= 40 * 1024)),
        (f"… with max_connections = 1000 (the upstream had {unc['max_in_flight_upstream']} at "
         f"once) (MiB)", mib(unc["rss_peak_kib"]), "", ""),
        ("exec → SERVING (ms)", f"{spread(st['tokengate'], '{:.1f}')} (echo "
         f"{spread(st['echo'], '{:.1f}')})", "≤ 20", verdict(statistics.median(st["tokengate"]) <= 20)),
    ]
    lines = [
        "| figure | measured: median (min–max) | target | |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        f"{s['rounds']} interleaved rounds; saturation {s['saturation_s']} s at 4 connections × "
        f"32 streams; {s['latency_calls']} sequential calls per latency run. "
        f"tokengate {env['commit']}, {env['date']}; {env['cpu']}, {env['nproc']} CPUs, kernel "
        f"{env['kernel']}, governor {env['governor']}; {env['h2load']}. System under test on CPU "
        f"{SUT_CPU}; h2load and the upstream on CPU {LOAD_CPU}; tokengate ran "
        f"{rss['tokengate_threads']} threads.",
    ]
    if results.get("smoke"):
        lines.insert(0, "**Smoke run: too short to mean anything; it only shows the harness "
                        "works.**\n")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p / 10 for p in range(0, 1000)] + [99.9, 99.99]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    labels = {"tokengate": "tokengate → upstream", "echo": "tonic echo (no upstream)",
              "direct": "direct HTTP/1.1 call to the upstream"}
    for name, values in results["pooled_latency_us"].items():
        ordered = sorted(values)
        ys = [ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] for p in points]
        ax.plot(points, ys, label=labels[name])
    ax.set_yscale("log")
    ax.set_xlabel("percentile (one call at a time)")
    ax.set_ylabel("latency (µs, log scale)")
    ax.set_title(f"tokengate {results['environment']['commit']}: latency per call, "
                 f"{results['settings']['rounds']} rounds pooled")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a short run that checks the harness works; its numbers mean nothing")
    parser.add_argument("--out", type=Path, help="where the table, plot and JSON go "
                        "(default bench/results, or target/bench-smoke with --smoke)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5)")
    args = parser.parse_args()
    settings = Settings.smoke() if args.smoke else Settings()
    if args.rounds:
        settings.rounds = args.rounds
    out = args.out or ROOT / ("target/bench-smoke" if args.smoke else "bench/results")
    if len(os.sched_getaffinity(0)) < 2 or not {SUT_CPU, LOAD_CPU} <= os.sched_getaffinity(0):
        print(f"bench: needs CPUs {LOAD_CPU} and {SUT_CPU}", file=sys.stderr)
        return 2
    for binary in (TOKENGATE, BENCH):
        if not binary.exists():
            print(f"bench: {binary} is missing; run bench/run", file=sys.stderr)
            return 2
    os.sched_setaffinity(0, {LOAD_CPU})  # the harness itself stays off the measured core

    with tempfile.TemporaryDirectory(prefix="tokengate-bench-") as tmp:
        work = Path(tmp)
        try:
            bench = Bench(settings, work)
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
        except BenchError as e:
            print(f"bench: {e}", file=sys.stderr)
            return 1
    results["settings"] = settings.__dict__
    results["environment"] = environment()
    results["smoke"] = args.smoke
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


if __name__ == "__main__":
    sys.exit(main())
