"""The example clients (examples/clients/{python,go,node}) against the real tokengate binary.

Each test starts a local upstream (token endpoint and a resource API on one
ThreadingHTTPServer, counting every request) and a fresh tokengate on port 0, builds or
prepares one client, runs it, and checks both what the client printed and what the upstream
saw: the default and the named client's tokens, a 503 whose RetryInfo the client waited out
before its one retry, a 401 from the API answered by a fresh token after
`rejected_access_token`, and an OAuth error and a local validation error decoded from their
google.rpc details.

Run via `scripts/test`, or directly (after `npm ci --prefix examples/clients/node` and the
Go packages scripts/test installs):
    TOKENGATE_BIN=target/debug/tokengate .venv/bin/python -m pytest tests/clients -q
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc_tools
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# The binary as a process, shared with tests/python.
sys.path.insert(0, str(REPO_ROOT / "tests" / "python"))
from tokengate_process import Tokengate, binary  # noqa: E402
PROTO_DIR = REPO_ROOT / "proto"
EXAMPLES = REPO_ROOT / "examples" / "clients"

DEFAULT_CLIENT = "backend-default"
DEFAULT_SECRET = "default-client-secret-do-not-leak"
NAMED_CLIENT = "partner-app"
NAMED_SECRET = "named-client-secret-do-not-leak"
GOOD_JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMDAxIn0.c2lnbmVkLWJ5LXRoZS10ZXN0"
# What the examples send to show an OAuth error (an unsigned JWT).
UNSIGNED_JWT = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJkZW1vIn0."
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_PATH = "/restapi/oauth/token"
API_PATH = "/restapi/v1.0/account/~/extension/~"
# The upstream's first JWT answer is a 503 with this Retry-After. tokengate's
# request_timeout is set to the same value, so tokengate does not wait it out itself but
# answers UNAVAILABLE with RetryInfo, and the client must wait.
RETRY_AFTER_S = 2
# Slack for timers that may fire a little early (Node rounds to milliseconds).
TIMER_SLACK_S = 0.1
BAD_JWT_REQUEST_ID = "rc-req-bad-jwt"

STARTUP_DEADLINE_S = 30.0
SHUTDOWN_DEADLINE_S = 10.0
BUILD_TIMEOUT_S = 600
RUN_TIMEOUT_S = 120


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- upstream


@dataclass
class Seen:
    """One request the upstream received, and how it answered."""

    at: float
    method: str
    path: str
    headers: dict
    form: dict
    raw: str
    status: int = 0
    token: str = ""  # the access token issued, or the bearer token presented


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that exits with a keep-alive connection open resets it; that is no error.
        if not isinstance(sys.exc_info()[1], ConnectionResetError):
            super().handle_error(request, client_address)


@dataclass
class Upstream:
    """RingCentral's token endpoint and one resource API, scripted for the clients' tour."""

    requests: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    issued: dict = field(default_factory=dict)  # tokens issued, per prefix
    good_jwt_posts: int = 0
    # The API refuses this token although it has not expired (the session ended).
    refused: set = field(default_factory=lambda: {"named-token-1"})
    valid: set = field(default_factory=set)

    def start(self):
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # http.server names handlers do_<METHOD>
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode()
                seen = upstream._record(self, raw)
                status, body, headers = upstream._token_answer(seen)
                self._reply(seen, status, body, headers)

            def do_GET(self):
                seen = upstream._record(self, "")
                auth = seen.headers.get("authorization", "")
                seen.token = auth.removeprefix("Bearer ")
                if seen.path == API_PATH and seen.token in upstream.valid:
                    self._reply(seen, 200, {"id": 1001, "status": "Enabled"})
                else:
                    self._reply(seen, 401, {"errorCode": "TokenInvalid"})

            def _reply(self, seen, status, body, headers=None):
                seen.status = status
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format, *args):
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def _record(self, handler, raw: str) -> Seen:
        seen = Seen(
            at=time.monotonic(),
            method=handler.command,
            path=handler.path,
            headers={k.lower(): v for k, v in handler.headers.items()},
            form=urllib.parse.parse_qs(raw, keep_blank_values=True),
            raw=raw,
        )
        with self.lock:
            self.requests.append(seen)
        return seen

    def _issue(self, seen: Seen, prefix: str):
        with self.lock:
            self.issued[prefix] = self.issued.get(prefix, 0) + 1
            seen.token = f"{prefix}{self.issued[prefix]}"
            if seen.token not in self.refused:
                self.valid.add(seen.token)
        body = {
            "access_token": seen.token,
            "token_type": "bearer",
            "expires_in": 3600,
            "refresh_token": f"refresh-{seen.token}",
            "refresh_token_expires_in": 604800,
            "owner_id": "1001",
        }
        return 200, body, {}

    def _token_answer(self, seen: Seen):
        form = {k: v[0] for k, v in seen.form.items()}
        grant, client = form.get("grant_type"), form.get("client_id")
        if seen.path != TOKEN_PATH:
            return 404, {"error": "not_found"}, {}
        if grant == "client_credentials" and client == DEFAULT_CLIENT:
            return self._issue(seen, "default-token-")
        if grant == JWT_GRANT and client == NAMED_CLIENT and form.get("assertion") == GOOD_JWT:
            with self.lock:
                self.good_jwt_posts += 1
                first = self.good_jwt_posts == 1
            if first:
                body = {"errorCode": "CMN-211", "message": "Service Temporary Unavailable"}
                return 503, body, {"Retry-After": str(RETRY_AFTER_S)}
            return self._issue(seen, "named-token-")
        if grant == JWT_GRANT:
            body = {
                "error": "invalid_grant",
                "error_description": "Invalid JWT",
                "errors": [{"errorCode": "OAU-213", "message": "Token signature is invalid"}],
            }
            return 400, body, {"RCRequestId": BAD_JWT_REQUEST_ID}
        return 400, {"error": "invalid_request", "error_description": "unexpected request"}, {}

    def seen(self, method: str, path: str) -> list[Seen]:
        with self.lock:
            return [r for r in self.requests if r.method == method and r.path == path]


@dataclass
class Stack:
    upstream: Upstream
    addr: str
    tokengate: Tokengate


@pytest.fixture
def stack(tmp_path):
    upstream = Upstream().start()
    config = tmp_path / "tokengate.toml"
    config.write_text(
        f"""\
[server]
listen = "127.0.0.1:0"
shutdown_grace_period = "5s"

[upstream]
base_url = "http://127.0.0.1:{upstream.port}"
allow_insecure_http = true
request_timeout = "{RETRY_AFTER_S}s"

[clients]
allow_public = false

[[clients.registered]]
client_id = "{DEFAULT_CLIENT}"
client_secret = "{DEFAULT_SECRET}"
auth_method = "client_secret_basic"
default = true

[[clients.registered]]
client_id = "{NAMED_CLIENT}"
client_secret = "{NAMED_SECRET}"
auth_method = "client_secret_post"
allowed_grants = ["jwt_bearer"]
"""
    )
    tg = Tokengate(binary(), config, tmp_path)
    try:
        addr = tg.wait_listening(STARTUP_DEADLINE_S)
        yield Stack(upstream, addr, tg)
    finally:
        code = tg.stop(SHUTDOWN_DEADLINE_S)
        upstream.stop()
    assert code == 0, f"tokengate exited with {code} after SIGTERM\n{tg.logs()}"
    logs = tg.logs()
    for secret in (DEFAULT_SECRET, NAMED_SECRET, GOOD_JWT, "named-token-1", "named-token-2"):
        assert secret not in logs, f"{secret!r} appeared in tokengate's logs"


# --------------------------------------------------------------------------- running a client


LINE = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse(stdout: str) -> list[tuple[str, dict]]:
    """`event key=value ...` lines; quoted values are JSON strings."""
    events = []
    for line in stdout.splitlines():
        event, _, rest = line.partition(" ")
        fields = {k: json.loads(v) if v.startswith('"') else v for k, v in LINE.findall(rest)}
        events.append((event, fields))
    return events


def run_client(argv: list[str], stack: Stack, env: dict | None = None) -> list[tuple[str, dict]]:
    api_url = f"http://127.0.0.1:{stack.upstream.port}{API_PATH}"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENGATE_")}
    full_env.update(env or {})
    full_env["RC_JWT"] = GOOD_JWT
    done = subprocess.run(
        [*argv, "--addr", stack.addr, "--client-id", NAMED_CLIENT, "--api-url", api_url],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    report = f"exit {done.returncode}\n--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"
    assert done.returncode == 0, report
    for secret in (GOOD_JWT, "default-token-1", "named-token-1", "named-token-2"):
        assert secret not in done.stdout + done.stderr, f"the client printed {secret!r}\n{report}"
    return parse(done.stdout)


# --------------------------------------------------------------------------- the checks


def _one(events, event, step):
    found = [f for e, f in events if e == event and f.get("step") == step]
    assert len(found) == 1, f"expected one {event} step={step}, got {found}"
    return found[0]


def _metadata(events, step) -> dict:
    return {f["key"]: f["value"] for e, f in events if e == "metadata" and f.get("step") == step}


def check_tour(events: list[tuple[str, dict]], upstream: Upstream):
    """What every client must have printed and made the upstream see."""
    # The tour, in order (details lines aside).
    outline = [
        (e, f.get("step"))
        for e, f in events
        if e not in ("error_info", "metadata", "retry_info", "field_violation")
    ]
    assert outline == [
        ("token", "default"),
        ("failure", "named"),
        ("retry", "named"),
        ("token", "named"),
        ("api", "named"),
        ("token", "renewed"),
        ("api", "renewed"),
        ("failure", "bad_jwt"),
        ("failure", "bad_scope"),
        ("done", None),
    ], events

    # 1. The default client: tokengate sent its credentials as Basic.
    token = _one(events, "token", "default")
    assert token["source"] == "TOKEN_SOURCE_UPSTREAM"
    assert token["sha256"] == fingerprint("default-token-1")
    # A cached token lives until its planned renewal: 5 min before the upstream's 3600 s,
    # jittered up to 30 s earlier (contract §8.1 I10: the renewal ends it).
    assert 3270 <= int(token["expires_in_s"]) <= 3300, token
    (cc,) = [
        r
        for r in upstream.seen("POST", TOKEN_PATH)
        if r.form["grant_type"] == ["client_credentials"]
    ]
    basic = base64.b64encode(f"{DEFAULT_CLIENT}:{DEFAULT_SECRET}".encode()).decode()
    assert cc.headers.get("authorization") == f"Basic {basic}"
    assert cc.status == 200

    # 2. The named client's JWT grant: a 503 with Retry-After, decoded, waited out, retried.
    failure = _one(events, "failure", "named")
    assert failure["code"] == "UNAVAILABLE", failure
    info = _one(events, "error_info", "named")
    assert (info["domain"], info["reason"]) == ("tokengate", "UPSTREAM_UNAVAILABLE")
    md = _metadata(events, "named")
    assert md["upstreamHttpStatus"] == "503", md
    assert md["upstreamErrorCode"] == "CMN-211", md
    assert md["clientId"] == NAMED_CLIENT, md
    assert _one(events, "retry_info", "named")["delay_ms"] == str(RETRY_AFTER_S * 1000)
    assert _one(events, "retry", "named")["delay_ms"] == str(RETRY_AFTER_S * 1000)
    token = _one(events, "token", "named")
    assert (token["source"], token["sha256"]) == (
        "TOKEN_SOURCE_UPSTREAM",
        fingerprint("named-token-1"),
    )

    jwt_posts = [
        r for r in upstream.seen("POST", TOKEN_PATH) if r.form.get("assertion") == [GOOD_JWT]
    ]
    assert [r.status for r in jwt_posts] == [503, 200, 200], [
        (r.status, r.token) for r in jwt_posts
    ]
    for post in jwt_posts:
        assert post.form["grant_type"] == [JWT_GRANT]
        assert post.form["client_id"] == [NAMED_CLIENT]
        assert post.form["client_secret"] == [NAMED_SECRET]
    waited = jwt_posts[1].at - jwt_posts[0].at
    assert waited >= RETRY_AFTER_S - TIMER_SLACK_S, (
        f"retried after {waited:.3f}s, before RetryInfo's delay"
    )

    # 3. The API refused named-token-1; rejected_access_token brought a fresh token upstream.
    assert _one(events, "api", "named") == {
        "step": "named",
        "status": "401",
        "sha256": fingerprint("named-token-1"),
    }
    token = _one(events, "token", "renewed")
    assert (token["source"], token["sha256"]) == (
        "TOKEN_SOURCE_UPSTREAM",
        fingerprint("named-token-2"),
    )
    assert jwt_posts[2].token == "named-token-2"
    assert _one(events, "api", "renewed") == {
        "step": "renewed",
        "status": "200",
        "sha256": fingerprint("named-token-2"),
    }
    api_calls = [(r.token, r.status) for r in upstream.seen("GET", API_PATH)]
    assert api_calls == [("named-token-1", 401), ("named-token-2", 200)]
    for post in upstream.seen("POST", TOKEN_PATH):
        assert "named-token-1" not in post.raw, "the rejected token must not go upstream"

    # 4a. An OAuth error: ErrorInfo with the upstream's error, code and request id; no retry.
    assert _one(events, "failure", "bad_jwt")["code"] == "UNAUTHENTICATED"
    info = _one(events, "error_info", "bad_jwt")
    assert (info["domain"], info["reason"]) == ("tokengate", "INVALID_GRANT")
    md = _metadata(events, "bad_jwt")
    assert md["oauthError"] == "invalid_grant", md
    assert md["upstreamErrorCode"] == "OAU-213", md
    assert md["upstreamRequestId"] == BAD_JWT_REQUEST_ID, md
    assert md["upstreamHttpStatus"] == "400", md
    assert not [f for e, f in events if e in ("retry_info", "retry") and f["step"] == "bad_jwt"]
    bad = [
        r for r in upstream.seen("POST", TOKEN_PATH) if r.form.get("assertion") == [UNSIGNED_JWT]
    ]
    assert [r.status for r in bad] == [400], "an OAuth error is sent once and not retried"

    # 4b. Local validation: INVALID_ARGUMENT with BadRequest naming the field; nothing sent.
    assert _one(events, "failure", "bad_scope")["code"] == "INVALID_ARGUMENT"
    info = _one(events, "error_info", "bad_scope")
    assert (info["domain"], info["reason"]) == ("tokengate", "INVALID_REQUEST")
    violation = _one(events, "field_violation", "bad_scope")
    assert violation["field"] == "scopes[0]", violation
    assert "whitespace" in violation["description"], violation

    # Every POST accounted for: 1 default, 3 named (503, retry, renewal), 1 bad JWT.
    assert len(upstream.seen("POST", TOKEN_PATH)) == 5


# --------------------------------------------------------------------------- the clients


@pytest.fixture(scope="session")
def python_stubs(tmp_path_factory) -> Path:
    """token_pb2 / token_pb2_grpc generated by grpcio-tools, as examples/clients/python says."""
    out = tmp_path_factory.mktemp("python-gen")
    wkt = Path(grpc_tools.__file__).resolve().parent / "_proto"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{wkt}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "tokengate/v1/token.proto",
        ],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="session")
def go_client(tmp_path_factory) -> Path:
    """The Go client, built in GOPATH mode from Debian's packages by build.sh."""
    out = tmp_path_factory.mktemp("go-build")
    for tool in ("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc"):
        assert shutil.which(tool), f"{tool} is missing; scripts/test installs the Go packages"
    done = subprocess.run(
        ["bash", str(EXAMPLES / "go" / "build.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert done.returncode == 0, f"build.sh failed:\n{done.stdout}\n{done.stderr}"
    binary = out / "tokengate-client"
    assert binary.exists(), done.stdout
    return binary


@pytest.fixture(scope="session")
def node_client() -> list[str]:
    node_dir = EXAMPLES / "node"
    assert shutil.which("node"), "node is missing"
    for package in ("@grpc/grpc-js", "@grpc/proto-loader", "protobufjs"):
        assert (node_dir / "node_modules" / package).is_dir(), (
            f"{package} is not installed; run `npm ci --prefix {node_dir}` (scripts/test does)"
        )
    return ["node", str(node_dir / "client.js")]


def test_python_client(stack, python_stubs):
    events = run_client(
        [sys.executable, str(EXAMPLES / "python" / "client.py")],
        stack,
        env={"PYTHONPATH": str(python_stubs)},
    )
    check_tour(events, stack.upstream)


def test_go_client(stack, go_client):
    # Every request the Go client sends has a oneof arm set (client_credentials, jwt_bearer):
    # with golang/protobuf 1.3 that panics, so this test proves the 1.5 package is in use.
    events = run_client([str(go_client)], stack)
    check_tour(events, stack.upstream)


def test_node_client(stack, node_client):
    events = run_client(node_client, stack)
    check_tour(events, stack.upstream)
