"""The real tokengate binary as a child process, and the Python stubs of its proto.

Shared by the tests in tests/python: each starts tokengate on 127.0.0.1 port 0 with
`--log-format json` (or text, when a test is about text lines) and waits for its `listening`
line before talking to it.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import grpc_tools
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "proto"
PROTO_FILE = PROTO_DIR / "tokengate" / "v1" / "token.proto"
# The text format's startup line: `... INFO tokengate::startup: listening addr=127.0.0.1:N ...`.
TEXT_LISTENING = re.compile(r"tokengate::startup: listening addr=(127\.0\.0\.1:\d+)")


def generate_stubs(out: Path) -> types.SimpleNamespace:
    """Generates token_pb2 / token_pb2_grpc into `out` and imports them."""
    # grpc_tools ships the well-known types (google/protobuf/*.proto) in its _proto dir.
    wkt = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{wkt}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO_FILE),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"grpc_tools.protoc failed ({done.returncode}): {done.stderr}"
    sys.path.insert(0, str(out))
    try:
        importlib.invalidate_caches()
        token_pb2 = importlib.import_module("tokengate.v1.token_pb2")
        token_pb2_grpc = importlib.import_module("tokengate.v1.token_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    return types.SimpleNamespace(msg=token_pb2, grpc=token_pb2_grpc)


class Tokengate:
    def __init__(self, binary: Path, config: Path, workdir: Path, extra_env: dict | None = None,
                 log_format: str = "json"):
        # Nothing from the outer environment configures it: no TOKENGATE_* and no OTEL_*.
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("TOKENGATE_", "OTEL_"))
        }
        env.update(extra_env or {})
        # tokengate's own events at every level, so the no-secret-in-logs check below covers
        # debug and trace events too; dependencies stay at info.
        env["RUST_LOG"] = "info,tokengate=trace"
        self.stderr_path = workdir / "tokengate.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--config", str(config), "--log-format", log_format],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=workdir,
            env=env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        # Drain stdout for the whole life of the process so the pipe never fills up.
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self):
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)  # EOF

    def logs(self) -> str:
        """Everything it wrote so far, stdout and stderr."""
        return "\n".join(self.lines) + "\n" + self.stderr_path.read_text(errors="replace")

    def diagnostics(self) -> str:
        try:
            stderr = self.stderr_path.read_text(errors="replace")
        except OSError:
            stderr = ""
        out = "\n".join(self.lines[-50:])
        return f"--- tokengate stdout (last 50 lines) ---\n{out}\n--- tokengate stderr ---\n{stderr}"

    def wait_for_event(self, matches, deadline_s: float, what: str) -> dict:
        """Returns the first JSON log line not yet read for which `matches(event)` holds."""
        deadline = time.monotonic() + deadline_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"tokengate did not log {what} within {deadline_s}s\n" + self.diagnostics())
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"tokengate exited before logging {what}\n" + self.diagnostics())
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and matches(event):
                return event

    def events(self) -> list[dict]:
        """Every JSON log line so far."""
        out = []
        for line in list(self.lines):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out

    def wait_listening(self, deadline_s: float) -> str:
        deadline = time.monotonic() + deadline_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"tokengate did not log 'listening' within {deadline_s}s\n" + self.diagnostics()
                )
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait(timeout=5)
                raise AssertionError(
                    f"tokengate exited with {code} before logging 'listening'\n" + self.diagnostics()
                )
            text = TEXT_LISTENING.search(line)
            if text:
                return text.group(1)
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # not a JSON log line; --log-format json should make this rare
            fields = event.get("fields") if isinstance(event, dict) else None
            if isinstance(fields, dict) and fields.get("message") == "listening":
                addr = fields.get("addr")
                assert isinstance(addr, str) and addr.startswith("127.0.0.1:"), (
                    f"'listening' line has no usable fields.addr: {line}"
                )
                return addr

    def stop(self, deadline_s: float) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"tokengate did not exit within {deadline_s}s of SIGTERM\n" + self.diagnostics()
            )
        finally:
            self._reader.join(timeout=5)
            self._stderr.close()
        return code


def binary() -> Path:
    path = Path(os.environ.get("TOKENGATE_BIN", "target/debug/tokengate"))
    if not path.is_absolute():
        path = (Path.cwd() / path) if (Path.cwd() / path).exists() else (REPO_ROOT / path)
    if not path.exists():
        pytest.fail(f"tokengate binary not found at {path}; run `cargo build --bins` or set TOKENGATE_BIN")
    return path
