#!/usr/bin/env python3
"""Soak driver for tokengate; run it through `scripts/soak`, which builds the release binary.

Starts, all on 127.0.0.1:
  * a fast token endpoint (this file with --serve-upstream: asyncio, HTTP/1.1 keep-alive,
    200 with a RingCentral-shaped token for every POST), in its own process;
  * `tokengate serve` (the binary given by --binary), logging JSON to a temporary file;
  * N concurrent callers (grpc.aio, one coroutine each, spread over a few channels) doing
    GetToken (jwt_bearer) back to back for M minutes.

Samples tokengate's VmRSS, VmHWM, threads, open fds and CPU time from /proc every few
seconds, then sends SIGTERM, checks the drain, and prints a Markdown report on stdout.
Every loop is bounded in time (and the callers also in count, --max-calls).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO_ROOT / "proto"
PROTO_FILE = PROTO_DIR / "tokengate" / "v1" / "token.proto"

CLIENT_ID = "soak-app"
CLIENT_SECRET = "soak-client-secret"
# An unsigned JWT ({"alg":"none"}.{"sub":"soak-user","iss":"soak"}.sig); the local upstream
# does not verify it.
ASSERTION = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJzb2FrLXVzZXIiLCJpc3MiOiJzb2FrIn0.c2ln"


# --------------------------------------------------------------------------- upstream


def serve_upstream(lifetime_s: float) -> None:
    """The local token endpoint. Prints its port, then serves until SIGTERM or lifetime_s,
    and prints how many requests it answered."""
    served = 0
    body_template = (
        '{"access_token":"U09BSy1BQ0NFU1MtVE9LRU4t%08d","token_type":"bearer",'
        '"expires_in":3600,"refresh_token":"U09BSy1SRUZSRVNILVRPS0VO","refresh_token_expires_in":604800,'
        '"scope":"ReadAccounts","owner_id":"1001","endpoint_id":"EP-soak"}'
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                if length:
                    await reader.readexactly(length)
                served += 1
                body = (body_template % (served % 100_000_000)).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"RCRequestId: soak\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        print(server.sockets[0].getsockname()[1], flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        try:
            await asyncio.wait_for(stop.wait(), timeout=lifetime_s)
        except asyncio.TimeoutError:
            pass
        server.close()
        print(f"served {served}", flush=True)

    asyncio.run(main())


# --------------------------------------------------------------------------- helpers


def generate_stubs(out: Path):
    import grpc_tools

    wkt = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc",
            f"-I{PROTO_DIR}", f"-I{wkt}",
            f"--python_out={out}", f"--grpc_python_out={out}",
            str(PROTO_FILE),
        ],
        capture_output=True, text=True, timeout=120,
    )
    if done.returncode != 0:
        sys.exit(f"grpc_tools.protoc failed: {done.stderr}")
    sys.path.insert(0, str(out))
    importlib.invalidate_caches()
    return (
        importlib.import_module("tokengate.v1.token_pb2"),
        importlib.import_module("tokengate.v1.token_pb2_grpc"),
    )


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB, Threads, open fds, and CPU seconds (user + system)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of stat (utime, stime), counted from after the ")".
    ticks = int(fields[11]) + int(fields[12])
    out["cpu_s"] = ticks / os.sysconf("SC_CLK_TCK")
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, int(round(p / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[rank]


def machine_facts() -> list[tuple[str, str]]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return "?"

    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kib = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        memory = f"{mem_kib / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration):
        memory = "?"
    commit = run("git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD")
    dirty = run("git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no")
    return [
        ("CPU", f"{os.cpu_count()} cores ({model})"),
        ("Memory", memory),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Rust", run("rustc", "--version")),
        ("Python / grpcio", f"{platform.python_version()} / {__import__('grpc').__version__}"),
        ("Commit", commit + (" (with uncommitted changes)" if dirty else "")),
    ]


# --------------------------------------------------------------------------- the run


def start_tokengate(binary: str, upstream_port: int, workdir: Path, log_level: str):
    config = workdir / "tokengate.toml"
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:0"
shutdown_grace_period = "10s"

[upstream]
base_url = "http://127.0.0.1:{upstream_port}"
allow_insecure_http = true
request_timeout = "10s"

[clients]
allow_public = false

[[clients.registered]]
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
auth_method = "client_secret_basic"
default = true
"""
    )
    log_path = workdir / "tokengate.log"
    log = open(log_path, "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENGATE_")}
    env["RUST_LOG"] = log_level
    proc = subprocess.Popen(
        [binary, "serve", "--config", str(config), "--log-format", "json"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if '"message":"listening"' in line:
                return proc, json.loads(line)["fields"]["addr"], log_path
        if proc.poll() is not None:
            sys.exit(f"tokengate exited with {proc.returncode}:\n{log_path.read_text()}")
        time.sleep(0.05)
    proc.kill()
    sys.exit("tokengate did not log `listening` within 30 s")


async def drive(args, pb, pb_grpc, addr: str, pid: int):
    import grpc

    channels = [grpc.aio.insecure_channel(addr) for _ in range(max(1, min(args.channels, args.callers)))]
    stubs = [pb_grpc.TokenServiceStub(c) for c in channels]
    request = pb.GetTokenRequest(jwt_bearer=pb.JwtBearerGrant(assertion=ASSERTION))

    latencies: list[float] = []  # seconds, every successful or failed call
    interval: list[float] = []
    errors: dict[str, int] = {}
    error_examples: dict[str, str] = {}
    interval_errors = 0
    calls = 0
    started = time.monotonic()
    end = started + args.minutes * 60

    async def caller(i: int) -> None:
        nonlocal calls, interval_errors
        stub = stubs[i % len(stubs)]
        while time.monotonic() < end and calls < args.max_calls:
            calls += 1
            t0 = time.perf_counter()
            try:
                response = await stub.GetToken(request, timeout=args.rpc_timeout)
                if not response.access_token:
                    raise RuntimeError("empty access_token")
            except grpc.aio.AioRpcError as e:
                name = e.code().name
                errors[name] = errors.get(name, 0) + 1
                error_examples.setdefault(name, e.details() or "")
                interval_errors += 1
            except RuntimeError as e:
                errors["BAD_TOKEN"] = errors.get("BAD_TOKEN", 0) + 1
                error_examples.setdefault("BAD_TOKEN", str(e))
                interval_errors += 1
            elapsed = time.perf_counter() - t0
            latencies.append(elapsed)
            interval.append(elapsed)

    samples = []

    def sample() -> None:
        nonlocal interval, interval_errors
        now = time.monotonic()
        status = proc_status(pid)
        window = sorted(interval)
        samples.append({
            "t": now - started,
            "calls": len(window),
            "errors": interval_errors,
            "p50": percentile(window, 50),
            "p99": percentile(window, 99),
            **status,
        })
        interval, interval_errors = [], 0

    async def sampler() -> None:
        # The last sample is taken after the callers finished (see below), so that it also
        # holds the calls still in flight when the time ran out.
        sample()
        while True:
            next_tick = samples[-1]["t"] + started + args.sample_every
            if next_tick >= end:
                return
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            sample()

    baseline = proc_status(pid)
    sampling = asyncio.create_task(sampler())
    await asyncio.gather(*(caller(i) for i in range(args.callers)))
    duration = time.monotonic() - started
    await sampling
    sample()
    for c in channels:
        await c.close()
    return {
        "latencies": latencies,
        "errors": errors,
        "error_examples": error_examples,
        "duration": duration,
        "samples": samples,
        "baseline": baseline,
    }


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def report(args, facts, result, upstream_served: int, shutdown: str, log_lines: int) -> str:
    lat = sorted(result["latencies"])
    calls = len(lat)
    errors = sum(result["errors"].values())
    samples = result["samples"]
    first, last = samples[0], samples[-1]
    cpu = last["cpu_s"] - result["baseline"]["cpu_s"]
    out = []
    out.append("# tokengate soak run\n")
    out.append(
        "Produced by `scripts/soak` (see the script's header for the options); rerun the "
        "command below to reproduce.\n"
    )
    out.append("## Setup\n")
    out.append(f"- Command: `{args.command}`")
    out.append(f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    for key, value in facts:
        out.append(f"- {key}: {value}")
    out.append(
        f"- Load: {args.callers} concurrent callers (grpc.aio coroutines in one Python process, "
        f"over {min(args.channels, args.callers)} HTTP/2 channels), GetToken `jwt_bearer` back to back "
        f"for {args.minutes:g} min, per-call timeout {args.rpc_timeout:g} s."
    )
    out.append(
        "- Upstream: local asyncio HTTP/1.1 token endpoint (keep-alive, answers 200 at once) in "
        "its own process. tokengate: release build, `client_secret_basic`, "
        f"`RUST_LOG={args.log_level}`, JSON logs to a file. All three share the same cores, "
        "so the figures are a floor for tokengate itself, not its ceiling."
    )
    out.append("")
    out.append("## Summary\n")
    out.append("| metric | value |")
    out.append("|---|---|")
    out.append(f"| calls | {calls:,} |")
    out.append(f"| succeeded | {calls - errors:,} |")
    by_code = ", ".join(f"{k}: {v:,}" for k, v in sorted(result["errors"].items())) or "none"
    out.append(f"| errors | {errors:,} ({by_code}) |")
    out.append(f"| throughput | {calls / result['duration']:,.0f} calls/s over {result['duration']:.1f} s |")
    out.append(
        f"| latency p50 / p90 / p99 / p99.9 / max | {fmt_ms(percentile(lat, 50))} / "
        f"{fmt_ms(percentile(lat, 90))} / {fmt_ms(percentile(lat, 99))} / "
        f"{fmt_ms(percentile(lat, 99.9))} / {fmt_ms(lat[-1] if lat else float('nan'))} ms |"
    )
    out.append(f"| upstream requests answered | {upstream_served:,} |")
    out.append(
        f"| tokengate VmRSS: idle before load / first sample / last sample / peak (VmHWM) | "
        f"{result['baseline']['VmRSS'] / 1024:.1f} / {first['VmRSS'] / 1024:.1f} / "
        f"{last['VmRSS'] / 1024:.1f} / {last['VmHWM'] / 1024:.1f} MiB |"
    )
    out.append(
        f"| tokengate CPU | {cpu:.1f} s = {100 * cpu / result['duration']:.0f} % of one core on average |"
    )
    out.append(f"| tokengate log lines written | {log_lines:,} |")
    out.append(f"| shutdown (SIGTERM) | {shutdown} |")
    if result["error_examples"]:
        out.append("")
        out.append("First message per error code:")
        for code, message in sorted(result["error_examples"].items()):
            out.append(f"- `{code}`: {message}")
    out.append("")
    out.append(f"## Over time (a sample every {args.sample_every:g} s; latency over the interval)\n")
    out.append("| t (s) | calls | calls/s | errors | p50 (ms) | p99 (ms) | VmRSS (MiB) | CPU (% of a core) | threads | fds |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    prev_t, prev_cpu = 0.0, result["baseline"]["cpu_s"]
    for s in samples:
        span = s["t"] - prev_t
        rate = s["calls"] / span if span > 0 else 0.0
        cpu_pct = 100 * (s["cpu_s"] - prev_cpu) / span if span > 0 else 0.0
        p50 = fmt_ms(s["p50"]) if s["calls"] else "-"
        p99 = fmt_ms(s["p99"]) if s["calls"] else "-"
        out.append(
            f"| {s['t']:.0f} | {s['calls']:,} | {rate:,.0f} | {s['errors']} | {p50} | {p99} | "
            f"{s['VmRSS'] / 1024:.1f} | {cpu_pct:.0f} | {s['Threads']} | {s['fds']} |"
        )
        prev_t, prev_cpu = s["t"], s["cpu_s"]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lifetime", type=float, default=3600, help=argparse.SUPPRESS)
    parser.add_argument("--binary", default=str(REPO_ROOT / "target/release/tokengate"))
    parser.add_argument("--callers", type=int, default=32, help="concurrent callers (N)")
    parser.add_argument("--minutes", type=float, default=5, help="duration (M)")
    parser.add_argument("--sample-every", type=float, default=5, help="seconds between samples")
    parser.add_argument("--channels", type=int, default=4, help="gRPC channels shared by the callers")
    parser.add_argument("--rpc-timeout", type=float, default=10, help="per-call timeout, seconds")
    parser.add_argument("--max-calls", type=int, default=20_000_000, help="stop after this many calls")
    parser.add_argument("--log-level", default="info", help="tokengate's RUST_LOG")
    args = parser.parse_args()

    if args.serve_upstream:
        serve_upstream(args.lifetime)
        return
    if args.callers < 1 or args.minutes <= 0 or args.sample_every <= 0:
        sys.exit("--callers, --minutes and --sample-every must be positive")
    args.command = os.environ.get("SOAK_COMMAND") or "scripts/soak " + " ".join(sys.argv[1:])

    with tempfile.TemporaryDirectory(prefix="tokengate-soak-") as tmp:
        workdir = Path(tmp)
        pb, pb_grpc = generate_stubs(workdir / "stubs")
        upstream = subprocess.Popen(
            [sys.executable, __file__, "--serve-upstream", "--lifetime", str(args.minutes * 60 + 120)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )
        tokengate = None
        try:
            port = int(upstream.stdout.readline())
            tokengate, addr, log_path = start_tokengate(args.binary, port, workdir, args.log_level)
            print(f"soak: tokengate pid {tokengate.pid} on {addr}, upstream on 127.0.0.1:{port}; "
                  f"{args.callers} callers for {args.minutes:g} min", file=sys.stderr)
            facts = machine_facts()
            result = asyncio.run(drive(args, pb, pb_grpc, addr, tokengate.pid))

            tokengate.send_signal(signal.SIGTERM)
            code = tokengate.wait(timeout=30)
            log = log_path.read_text(errors="replace").splitlines()
            drained = next((l for l in reversed(log) if '"drained"' in l), "")
            panicked = any("panicked" in l for l in log)
            shutdown = f"exit {code}, " + (
                "drained=true" if '"drained":true' in drained else f"NOT drained: {drained}"
            ) + (", PANIC in the log" if panicked else ", no panic in the log")
            tokengate = None

            upstream.send_signal(signal.SIGTERM)
            tail = upstream.communicate(timeout=30)[0].split()
            served = int(tail[-1]) if len(tail) >= 2 and tail[-2] == "served" else -1
            print(report(args, facts, result, served, shutdown, len(log)), end="")
        finally:
            if tokengate is not None and tokengate.poll() is None:
                tokengate.kill()
                tokengate.wait()
            if upstream.poll() is None:
                upstream.kill()
                upstream.wait()


if __name__ == "__main__":
    main()
