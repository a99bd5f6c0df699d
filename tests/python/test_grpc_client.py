"""tokengate from Python: the real binary, a grpcio client, and a local mock upstream.

The stubs are generated from proto/tokengate/v1/token.proto at test time, so this module also
proves the proto compiles with grpcio-tools. The upstream is a small ThreadingHTTPServer that
plays RingCentral's `POST /restapi/oauth/token`.

Run via `scripts/test`, or directly:
    TOKENGATE_BIN=target/debug/tokengate .venv/bin/python -m pytest tests/python -q
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tokengate_process import Tokengate, binary, generate_stubs

CLIENT_ID = "py-app"
CLIENT_SECRET = "py-client-secret"
USERNAME = "+16505550100*101"
RIGHT_PASSWORD = "right-password"
WRONG_PASSWORD = "wrong-password-do-not-leak"

TOKEN_BODY = {
    "access_token": "py-access-token",
    "token_type": "bearer",
    "expires_in": 3600,
    "refresh_token": "py-refresh-token",
    "refresh_token_expires_in": 604800,
    "scope": "ReadAccounts SMS",
    "owner_id": "1001",
    "endpoint_id": "EP1",
}
INVALID_GRANT_BODY = {
    "error": "invalid_grant",
    "error_description": "Invalid resource owner credentials",
    "errors": [{"errorCode": "OAU-140", "message": "Invalid resource owner credentials"}],
}

# Values that must never appear in tokengate's logs or error details.
SECRETS = (
    CLIENT_SECRET,
    RIGHT_PASSWORD,
    WRONG_PASSWORD,
    TOKEN_BODY["access_token"],
    TOKEN_BODY["refresh_token"],
)

STARTUP_DEADLINE_S = 30.0
SHUTDOWN_DEADLINE_S = 10.0
RPC_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------- stubs


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """Generates token_pb2 / token_pb2_grpc into a tmp dir and imports them."""
    return generate_stubs(tmp_path_factory.mktemp("stubs"))


# --------------------------------------------------------------------------- mock upstream


class Upstream:
    """A RingCentral-like token endpoint that records every request it gets."""

    def __init__(self):
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 (http.server naming)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode("utf-8")
                record = {
                    "method": "POST",
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "form": urllib.parse.parse_qs(raw, keep_blank_values=True),
                    "raw": raw,
                }
                with upstream._lock:
                    upstream.requests.append(record)

                if self.path != "/restapi/oauth/token":
                    self._reply(404, {"error": "not_found"})
                elif record["form"].get("grant_type") == ["password"] and record["form"].get(
                    "password"
                ) == [RIGHT_PASSWORD]:
                    self._reply(200, TOKEN_BODY)
                else:
                    self._reply(400, INVALID_GRANT_BODY, {"RCRequestId": "req-123"})

            def _reply(self, status, body, extra_headers=None):
                data = json.dumps(body).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (extra_headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format, *args):  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def take(self) -> list[dict]:
        with self._lock:
            got, self.requests = self.requests, []
        return got


@pytest.fixture(scope="session")
def upstream():
    up = Upstream()
    up.start()
    yield up
    up.stop()


@pytest.fixture(autouse=True)
def _fresh_upstream_log(upstream):
    upstream.take()
    yield


# --------------------------------------------------------------------------- tokengate process


@pytest.fixture(scope="session")
def tokengate_addr(upstream, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tokengate")
    config = workdir / "tokengate.toml"
    config.write_text(
        f"""\
[server]
listen = "127.0.0.1:0"
shutdown_grace_period = "5s"

[upstream]
base_url = "http://127.0.0.1:{upstream.port}"
allow_insecure_http = true

[clients]
allow_public = false

[[clients.registered]]
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
auth_method = "client_secret_basic"
default = true
"""
    )
    tg = Tokengate(binary(), config, workdir)
    try:
        addr = tg.wait_listening(STARTUP_DEADLINE_S)
    except BaseException:
        if tg.proc.poll() is None:
            tg.proc.kill()
        tg.proc.wait()
        raise
    yield addr
    code = tg.stop(SHUTDOWN_DEADLINE_S)
    assert code == 0, f"tokengate exited with {code} after SIGTERM\n" + tg.diagnostics()
    # Secrets and tokens never reach the logs (contract §3), at any level.
    logs = "\n".join(tg.lines) + tg.stderr_path.read_text(errors="replace")
    for secret in SECRETS:
        assert secret not in logs, f"{secret!r} appeared in tokengate's logs"


@pytest.fixture(scope="session")
def stub(pb, tokengate_addr):
    channel = grpc.insecure_channel(tokengate_addr)
    grpc.channel_ready_future(channel).result(timeout=10)
    yield pb.grpc.TokenServiceStub(channel)
    channel.close()


# --------------------------------------------------------------------------- helpers


def _error_details(err: grpc.RpcError):
    """Returns (status proto, ErrorInfo, BadRequest or None) from grpc-status-details-bin."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no grpc-status-details-bin on {err.code()}: {err.details()!r}"
    info = None
    bad_request = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
    assert info is not None, f"no google.rpc.ErrorInfo among {[d.type_url for d in status.details]}"
    return status, info, bad_request


def _ts_seconds(ts) -> float:
    return ts.seconds + ts.nanos / 1e9


# --------------------------------------------------------------------------- tests


def test_password_grant_returns_typed_token(pb, stub, upstream):
    m = pb.msg
    request = m.GetTokenRequest(
        password=m.PasswordGrant(username=USERNAME, password=RIGHT_PASSWORD),
        scopes=["ReadAccounts", "SMS"],
    )

    before = time.time()
    response = stub.GetToken(request, timeout=RPC_TIMEOUT_S)
    after = time.time()

    assert response.access_token == "py-access-token"
    assert response.token_type == "bearer"
    assert response.expires_in.seconds == 3600
    assert response.HasField("expires_at")
    assert before + 3600 - 2 <= _ts_seconds(response.expires_at) <= after + 3600 + 2
    assert list(response.scopes) == ["ReadAccounts", "SMS"]
    assert response.refresh_token == "py-refresh-token"
    assert response.refresh_token_expires_in.seconds == 604800
    assert before + 604800 - 2 <= _ts_seconds(response.refresh_token_expires_at) <= after + 604800 + 2
    assert response.owner_id == "1001"
    assert response.endpoint_id == "EP1"

    got = upstream.take()
    assert len(got) == 1, f"expected one upstream request, got {len(got)}"
    req = got[0]
    assert req["path"] == "/restapi/oauth/token"
    form = req["form"]
    assert form["grant_type"] == ["password"]
    assert form["username"] == [USERNAME]
    assert form["password"] == [RIGHT_PASSWORD]
    assert form["scope"] == ["ReadAccounts SMS"]
    assert form["client_id"] == [CLIENT_ID]
    assert "client_secret" not in form, "client_secret_basic must not put the secret in the body"
    expected_basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert req["headers"].get("authorization") == f"Basic {expected_basic}"
    assert req["headers"].get("content-type", "").startswith("application/x-www-form-urlencoded")
    assert "application/json" in req["headers"].get("accept", "")
    assert "tokengate" in req["headers"].get("user-agent", "").lower()


def test_invalid_grant_is_unauthenticated_with_error_info(pb, stub, upstream):
    m = pb.msg
    request = m.GetTokenRequest(
        password=m.PasswordGrant(username=USERNAME, password=WRONG_PASSWORD),
    )

    with pytest.raises(grpc.RpcError) as excinfo:
        stub.GetToken(request, timeout=RPC_TIMEOUT_S)
    err = excinfo.value
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, f"{err.code()}: {err.details()!r}"

    status, info, _ = _error_details(err)
    assert info.domain == "tokengate"
    assert info.reason == "INVALID_GRANT"
    md = dict(info.metadata)
    assert md.get("oauthError") == "invalid_grant"
    assert md.get("upstreamErrorCode") == "OAU-140"
    assert md.get("upstreamHttpStatus") == "400"
    assert md.get("upstreamRequestId") == "req-123"
    assert md.get("grantType") == "password"
    assert md.get("clientId") == CLIENT_ID
    for value in md.values():
        assert len(value) <= 256

    message = err.details() or ""
    serialized = status.SerializeToString()
    for secret in (WRONG_PASSWORD, CLIENT_SECRET):
        assert secret not in message, f"{secret!r} leaked into the status message"
        assert secret.encode() not in serialized, f"{secret!r} leaked into the status details"
        for key, value in err.trailing_metadata() or ():
            raw = value if isinstance(value, bytes) else value.encode()
            assert secret.encode() not in raw, f"{secret!r} leaked into trailer {key}"

    got = upstream.take()
    assert len(got) == 1, "a 400 from upstream must not be retried"
    assert got[0]["form"]["password"] == [WRONG_PASSWORD]


def test_missing_grant_is_invalid_argument_without_upstream_call(pb, stub, upstream):
    m = pb.msg
    request = m.GetTokenRequest(scopes=["ReadAccounts"])

    with pytest.raises(grpc.RpcError) as excinfo:
        stub.GetToken(request, timeout=RPC_TIMEOUT_S)
    err = excinfo.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{err.code()}: {err.details()!r}"

    _, info, bad_request = _error_details(err)
    assert info.domain == "tokengate"
    assert info.reason == "INVALID_REQUEST"
    assert bad_request is not None, "local validation errors must carry google.rpc.BadRequest"
    fields = [v.field for v in bad_request.field_violations]
    assert "grant" in fields, f"field violations: {fields}"

    assert upstream.take() == [], "an invalid request must not reach the upstream"


def test_unregistered_client_is_permission_denied_without_upstream_call(pb, stub, upstream):
    m = pb.msg
    request = m.GetTokenRequest(
        client_id="not-registered",
        password=m.PasswordGrant(username=USERNAME, password=RIGHT_PASSWORD),
    )

    with pytest.raises(grpc.RpcError) as excinfo:
        stub.GetToken(request, timeout=RPC_TIMEOUT_S)
    err = excinfo.value
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, f"{err.code()}: {err.details()!r}"

    _, info, _ = _error_details(err)
    assert info.domain == "tokengate"
    assert info.reason == "UNKNOWN_CLIENT"
    assert upstream.take() == [], "an unknown client must not reach the upstream"
