"""The processes the benchmark starts (servers, redis-server) and the configs it writes them.

Shared by harness.py (the timed runs) and broker.py (upstream POSTs per client call).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
TOKENGATE = RELEASE / "tokengate"
BENCH = RELEASE / "tokengate-bench"
CLIENT_SECRET = "bench-secret-0123456789abcdef"
TICKS = os.sysconf("SC_CLK_TCK")
# The default client, cached by the broker; the pass-through client (`cache = false`).
CACHED_CLIENT, PASS_CLIENT = "bench-app", "bench-pass"


class BenchError(RuntimeError):
    """A run that did not measure what it claims to; the harness stops on it."""


class Server:
    """A child process (pinned when `cpu` is given) whose stdout is drained (tokengate logs
    every call to stdout, and a full pipe would stall it) and searched for the address it
    listens on, and for the `watch` strings, which it counts. A line that names an address and
    says `metrics` is tokengate's `/metrics` listener (logged before it listens for gRPC): that
    address is `metrics_addr`, not `addr`."""

    def __init__(self, name: str, argv: list[str], cpu: int | None,
                 watch: tuple[str, ...] = ()):
        self.name = name
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addr: str | None = None
        self.metrics_addr: str | None = None
        self.seen = {w: 0 for w in watch}
        self._lock = threading.Lock()
        self._seen = threading.Event()
        self._head: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._seen.wait(15) or self.addr is None:
            self.stop()
            raise BenchError(f"{name} did not start: {' '.join(self._head)[-2000:]}")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        pending = b""
        carry = ""
        longest = max((len(w) for w in self.seen), default=0)
        while chunk := os.read(self.proc.stdout.fileno(), 1 << 16):
            if self.addr is None:
                pending += chunk
                text = pending.decode(errors="replace")
                self._head.append(text)
                for line in text.splitlines():
                    if not (m := re.search(r"127\.0\.0\.1:(\d+)", line)):
                        continue
                    if "metrics" in line:
                        self.metrics_addr = f"127.0.0.1:{m.group(1)}"
                        continue
                    self.addr = f"127.0.0.1:{m.group(1)}"
                    self._seen.set()
                    break
            if self.seen:
                text = carry + chunk.decode(errors="replace")
                with self._lock:
                    for w in self.seen:
                        # A match that began in the carried tail was counted with it already.
                        self.seen[w] += text.count(w) - carry.count(w)
                carry = text[-longest:]
        self._seen.set()

    def count(self, what: str) -> int:
        with self._lock:
            return self.seen[what]

    def wait_for(self, what: str, times: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.count(what) < times:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited while waiting for {what!r}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not log {what!r} within {timeout:.0f} s")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid  # taskset execs the command, so this is the server itself

    def cpu_ticks(self) -> int:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, all threads

    def status(self, key: str) -> int:
        """A /proc/PID/status figure in KiB (VmRSS, VmHWM, RssAnon)."""
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


class Foreign:
    """CPU time used by processes that are not the benchmark's (not this process or its
    descendants): other builds and tests on a shared machine, and kernel threads. Sampled from
    /proc every `interval` seconds; a foreign process that exits between two samples loses its
    last interval, so this is a lower bound."""

    def __init__(self, interval: float = 0.5):
        self.me = os.getpid()
        self.ticks = 0
        self._seen: dict[tuple[int, int], int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._sample()

    def _sample(self) -> None:
        table = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                text = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            rest = text.rsplit(")", 1)[1].split()
            # ppid, utime + stime, start time (tells a reused pid from the old one)
            table[int(entry.name)] = (int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[19]))
        ours = own_tree(self.me, {pid: row[0] for pid, row in table.items()})
        seen = {}
        added = 0
        for pid, (_ppid, ticks, start) in table.items():
            if pid in ours:
                continue
            key = (pid, start)
            if self._seen is None:  # the first sample is the baseline
                previous = ticks
            else:
                previous = self._seen.get(key, 0)
            added += max(0, ticks - previous)
            seen[key] = ticks
        with self._lock:
            self._seen = seen
            self.ticks += added

    def seconds(self) -> float:
        """Foreign CPU seconds since the start; take differences around a run."""
        self._sample()
        with self._lock:
            return self.ticks / TICKS

    def stop(self) -> None:
        self._stop.set()


def own_tree(root: int, parents: dict[int, int]) -> set[int]:
    """`root` and every process descending from it, given each process's parent."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo += children.get(pid, [])
    return tree


def run(argv: list[str], cpu: int | None = None, **kwargs) -> str:
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(map(str, argv))} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def fetch(url: str, method: str = "GET") -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
        return r.read()


def upstream_stats(upstream: Server) -> dict:
    return json.loads(fetch(f"http://{upstream.addr}/stats"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# redis-server


def resp(command: list[str]) -> bytes:
    """A command in the Redis protocol."""
    out = [f"*{len(command)}\r\n".encode()]
    for part in command:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def parse_commandstats(info: str) -> dict[str, int]:
    """`INFO commandstats` → calls per command (`cmdstat_get:calls=3,usec=…` → {"get": 3})."""
    out = {}
    for line in info.splitlines():
        if m := re.match(r"cmdstat_([^:]+):calls=(\d+)", line):
            out[m.group(1)] = int(m.group(2))
    return out


def working_commands(stats: dict[str, int]) -> int:
    """Commands that do the broker's work: everything but health checks and our own INFO."""
    return sum(n for cmd, n in stats.items() if cmd not in ("ping", "info"))


class Redis:
    """Debian's redis-server on 127.0.0.1, nothing persisted, on a port of its own."""

    def __init__(self, cpu: int | None = None):
        self.cpu = cpu
        self.port = free_port()
        self.dir = tempfile.TemporaryDirectory(prefix="tokengate-bench-redis-")
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.dir.name,
                "--logfile", str(Path(self.dir.name) / "redis.log")]
        if self.cpu is not None:
            argv = ["taskset", "-c", str(self.cpu), *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.command(["PING"]).startswith(b"+PONG"):
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"redis-server did not start on port {self.port}")
            time.sleep(0.01)

    def command(self, command: list[str]) -> bytes:
        """One command on a fresh connection; the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(resp(command))
            reply = s.recv(1 << 20)
            if reply.startswith(b"$"):  # a bulk string: read all of it
                header, _, body = reply.partition(b"\r\n")
                size = int(header[1:])
                while len(body) < size + 2:
                    more = s.recv(1 << 20)
                    if not more:
                        break
                    body += more
                return body[:size]
            return reply

    def commandstats(self) -> dict[str, int]:
        return parse_commandstats(self.command(["INFO", "commandstats"]).decode())

    def kill(self) -> None:
        """SIGKILL: an outage with no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
        self.dir.cleanup()


# ---------------------------------------------------------------------------------------------
# tokengate's config


def write_config(path: Path, upstream: Server, *, max_connections: int | None = None,
                 cache: dict | None = None, broker: bool = True, metrics: bool = False) -> Path:
    """Two registered clients: `bench-app` (the default, cached) and `bench-pass`
    (`cache = false`: every call goes upstream). `cache` holds `[cache]` keys, with
    `redis_url` (and `redis_timeout`) for `[cache.redis]`. `broker = False` writes a config
    that tokengate before the broker reads (no cache keys at all). `metrics` turns on
    `/metrics` (and so the per-RPC recording) on a free port."""
    limit = "" if max_connections is None else f"max_connections = {max_connections}\n"
    metrics_listen = 'metrics_listen = "127.0.0.1:0"\n' if metrics else ""
    sections = ""
    if cache:
        cache = dict(cache)
        redis_url = cache.pop("redis_url", None)
        redis_timeout = cache.pop("redis_timeout", None)
        sections = "[cache]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in cache.items())
        if redis_url:
            sections += f'\n[cache.redis]\nurl = "{redis_url}"\n'
            if redis_timeout:
                sections += f'timeout = "{redis_timeout}"\n'
        sections += "\n"
    no_cache = "cache = false\n" if broker else ""
    path.write_text(f"""\
[server]
listen = "127.0.0.1:0"
{metrics_listen}
[upstream]
base_url = "http://{upstream.addr}"
allow_insecure_http = true
{limit}
{sections}[[clients.registered]]
client_id = "{CACHED_CLIENT}"
client_secret = "{CLIENT_SECRET}"
default = true

[[clients.registered]]
client_id = "{PASS_CLIENT}"
client_secret = "{CLIENT_SECRET}"
{no_cache}""")
    return path


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(str(value))
