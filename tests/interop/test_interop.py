"""tokengate against a real OAuth 2.0 server: panva's oidc-provider (OpenID-certified).

A mock upstream agrees with whoever wrote it; this suite runs the real tokengate binary in front
of an authorization server nobody here wrote (tests/interop/provider.mjs, configured at
RingCentral's paths) and drives it over gRPC through every flow the provider can play:
client_credentials (Basic and post), authorization_code + PKCE, refresh-token rotation, the
custom grants password / otp / jwt-bearer / partner_jwt, the device flow (pending, slow_down,
access_denied, expired_token, success), revocation, a wrong secret, a caller-supplied client
assertion, and the client assertions tokengate signs itself (private_key_jwt RS256 / ES256 /
PS256, client_secret_jwt HS256, configured audience and kid, key-file reload).

Each test asserts the gRPC outcome (code + google.rpc.ErrorInfo reason from
grpc-status-details-bin) and the tokens; tokens are checked live at the provider's
introspection endpoint, so a token tokengate made up or mangled fails the test.

Needs node (20+) and `npm ci --prefix tests/interop --no-audit --no-fund` once. Run:
    TOKENGATE_BIN=target/debug/tokengate .venv/bin/python -m pytest tests/interop -q
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.rpc import error_details_pb2
from grpc_status import rpc_status

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
PROVIDER_SCRIPT = HERE / "provider.mjs"

# The proto's Python stubs and the binary's path, shared with tests/python.
sys.path.insert(0, str(REPO_ROOT / "tests" / "python"))
from tokengate_process import binary, generate_stubs  # noqa: E402

STARTUP_DEADLINE_S = 30.0
SHUTDOWN_DEADLINE_S = 10.0
RPC_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 10.0
KEY_RELOAD_DEADLINE_S = 10.0

# Paths and values shared with provider.mjs.
TOKEN_PATH = "/restapi/oauth/token"
REVOKE_PATH = "/restapi/oauth/revoke"
DEVICE_AUTH_PATH = "/restapi/oauth/device"
INTROSPECTION_PATH = "/token/introspection"
REDIRECT_URI = "http://127.0.0.1:9/cb"
DEVICE_POLL_INTERVAL_S = 1.0
SHORT_DEVICE_CODE_TTL_S = 2.0
SECRETS = {
    "tg-basic": "tg-basic-secret-0123456789",
    "tg-post": "tg-post-secret-0123456789",
    "tg-wrong-secret": "the-real-secret-0123456789",
    "tg-device-short": "tg-device-short-secret-0123",
    "hs-client": "a-client-secret-that-is-at-least-32-bytes-long",
    "caller-hs": "caller-hs-secret-that-is-at-least-32-bytes-long",
}
# What tokengate is told for tg-wrong-secret.
NOT_THE_SECRET = "not-the-real-secret-9876543210"
USERNAME, PASSWORD = "alice", "wonderland"
OTP_CODE = "123456"
JWT_BEARER_ASSERTION = "interop-jwt-bearer-assertion"
PARTNER_JWT_ASSERTION = "interop-partner-jwt-assertion"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


# --------------------------------------------------------------------------- stubs


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """Generates token_pb2 / token_pb2_grpc from the proto into a tmp dir and imports them."""
    return generate_stubs(tmp_path_factory.mktemp("stubs"))


# --------------------------------------------------------------------------- processes


class Process:
    """A child process whose stdout lines are read on a thread (the pipe never fills up)."""

    def __init__(self, name: str, args: list[str], workdir: Path, env: dict[str, str]):
        self.name = name
        self.stderr_path = workdir / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr,
            cwd=workdir, env=env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self):
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)  # EOF

    def logs(self) -> str:
        try:
            stderr = self.stderr_path.read_text(errors="replace")
        except OSError:
            stderr = ""
        return "\n".join(self.lines) + "\n" + stderr

    def diagnostics(self) -> str:
        out = "\n".join(self.lines[-50:])
        try:
            err = self.stderr_path.read_text(errors="replace")[-8000:]
        except OSError:
            err = ""
        return f"--- {self.name} stdout (last 50 lines) ---\n{out}\n--- {self.name} stderr ---\n{err}"

    def wait_for_line(self, match, deadline_s: float):
        """Returns match(line) for the first stdout line where it is not None."""
        deadline = time.monotonic() + deadline_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.name}: not ready within {deadline_s}s\n" + self.diagnostics())
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait(timeout=5)
                raise AssertionError(f"{self.name} exited with {code} before it was ready\n" + self.diagnostics())
            try:
                found = match(json.loads(line))
            except (json.JSONDecodeError, AttributeError, TypeError):
                continue
            if found is not None:
                return found

    def stop(self, deadline_s: float = SHUTDOWN_DEADLINE_S) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not exit within {deadline_s}s of SIGTERM\n" + self.diagnostics())
        finally:
            self._reader.join(timeout=5)
            self._stderr.close()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=5)
        self._stderr.close()


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TOKENGATE_")}


# --------------------------------------------------------------------------- keys


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_b64u(n: int, length: int | None = None) -> str:
    return _b64u(n.to_bytes(length or (n.bit_length() + 7) // 8, "big"))


class KeyPair:
    """A private key written as PEM for tokengate, and its public JWK for the provider."""

    def __init__(self, kind: str, path: Path, kid: str | None, pkcs1: bool = False):
        if kind == "RSA":
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            nums = self.key.public_key().public_numbers()
            self.jwk = {"kty": "RSA", "n": _int_b64u(nums.n), "e": _int_b64u(nums.e)}
        else:
            self.key = ec.generate_private_key(ec.SECP256R1())
            nums = self.key.public_key().public_numbers()
            self.jwk = {"kty": "EC", "crv": "P-256", "x": _int_b64u(nums.x, 32), "y": _int_b64u(nums.y, 32)}
        if kid:
            self.jwk["kid"] = kid
        # PKCS#8 ("BEGIN PRIVATE KEY"), or PKCS#1 ("BEGIN RSA PRIVATE KEY") when asked.
        fmt = serialization.PrivateFormat.TraditionalOpenSSL if pkcs1 else serialization.PrivateFormat.PKCS8
        self.pem = self.key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
        self.path = path
        path.write_bytes(self.pem)


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    pairs = {
        "rs": KeyPair("RSA", d / "rs256.pem", kid=None),  # no kid configured: no kid header
        "es": KeyPair("EC", d / "es256.pem", kid="es-k1"),
        "ps": KeyPair("RSA", d / "ps256-pkcs1.pem", kid="ps-k1", pkcs1=True),
        # Reload: tokengate starts with rot-old in its key file; the provider trusts only rot-new.
        "rot-old": KeyPair("EC", d / "rot-old.pem", kid="rot"),
        "rot-new": KeyPair("EC", d / "rot-new.pem", kid="rot"),
    }
    assert b"BEGIN PRIVATE KEY" in pairs["es"].pem and b"BEGIN RSA PRIVATE KEY" in pairs["ps"].pem
    return pairs


# private_key_jwt clients: (client_id, alg, key the provider trusts, tokengate's extra settings).
def _jwt_clients(keys, issuer):
    return [
        ("pk-rs", "RS256", "rs", {"private_key_file": keys["rs"].path}),
        ("pk-es", "ES256", "es", {"private_key_file": keys["es"].path, "key_id": "es-k1"}),
        ("pk-ps", "PS256", "ps", {"private_key_file": keys["ps"].path, "key_id": "ps-k1"}),
        # assertion_audience: the issuer (accepted by the provider) ...
        ("pk-es-aud", "ES256", "es", {"private_key_file": keys["es"].path, "key_id": "es-k1",
                                      "assertion_audience": issuer}),
        # ... and an audience the provider refuses.
        ("pk-es-badaud", "ES256", "es", {"private_key_file": keys["es"].path, "key_id": "es-k1",
                                         "assertion_audience": "https://elsewhere.example/token"}),
        # A kid the client's JWKS does not have: the provider picks keys by kid, so it must refuse.
        ("pk-es-badkid", "ES256", "es", {"private_key_file": keys["es"].path, "key_id": "no-such-kid"}),
        ("pk-rotate", "ES256", "rot-new", {"private_key_file": keys["rot-old"].path.parent / "rotate.pem",
                                           "key_id": "rot"}),
    ]


# --------------------------------------------------------------------------- provider


class Provider:
    def __init__(self, proc: Process, issuer: str):
        self.proc = proc
        self.issuer = issuer
        self.token_url = issuer + TOKEN_PATH

    def requests(self) -> list[dict]:
        """Every form POST the provider got at its token and revocation endpoints, oldest first."""
        with urllib.request.urlopen(self.issuer + "/_interop/requests", timeout=HTTP_TIMEOUT_S) as r:
            return json.loads(r.read())

    def post(self, path: str, form: dict, client_id: str) -> tuple[int, dict]:
        """A form POST authenticated with the client's secret (HTTP Basic), as a device would."""
        req = urllib.request.Request(
            self.issuer + path, data=urllib.parse.urlencode(form).encode(), method="POST",
            headers={"Authorization": "Basic " + base64.b64encode(f"{client_id}:{SECRETS[client_id]}".encode()).decode(),
                     "Content-Type": "application/x-www-form-urlencoded"},
        )
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def introspect(self, token: str) -> dict:
        status, body = self.post(INTROSPECTION_PATH, {"token": token}, "tg-basic")
        assert status == 200, f"introspection failed: {status} {body}"
        return body


@pytest.fixture(scope="session")
def provider(keys, tmp_path_factory):
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH; the interop suite needs Node.js 20 or newer")
    if not (HERE / "node_modules" / "oidc-provider").is_dir():
        pytest.fail("oidc-provider is not installed: run `npm ci --prefix tests/interop --no-audit --no-fund`")
    workdir = tmp_path_factory.mktemp("provider")
    # The issuer is only known once the provider has bound its port, and the JWKS does not
    # depend on it, so the private_key_jwt clients are listed with a placeholder issuer here.
    clients = [
        {"client_id": cid, "alg": alg, "jwks": {"keys": [keys[key].jwk]}}
        for cid, alg, key, _ in _jwt_clients(keys, issuer="")
    ]
    clients_file = workdir / "jwt-clients.json"
    clients_file.write_text(json.dumps(clients))
    env = dict(os.environ, INTEROP_JWT_CLIENTS=str(clients_file), NODE_ENV="test")
    proc = Process("oidc-provider", [node, str(PROVIDER_SCRIPT)], workdir, env)
    try:
        issuer = proc.wait_for_line(lambda e: e.get("listening"), STARTUP_DEADLINE_S)
    except BaseException:
        proc.kill()
        raise
    assert issuer.startswith("http://127.0.0.1:"), issuer
    yield Provider(proc, issuer)
    proc.stop()


# --------------------------------------------------------------------------- tokengate


def _toml_str(value) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _client_toml(client_id: str, **settings) -> str:
    # This suite proves the wire format against a real server, call by call, so its clients
    # pass straight through the broker (tests/api and the broker's own tests cover that).
    settings.setdefault("cache", False)
    lines = ["[[clients.registered]]", f"client_id = {_toml_str(client_id)}"]
    for key, value in settings.items():
        rendered = "true" if value is True else "false" if value is False else _toml_str(value)
        lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"


def _config_head(provider) -> str:
    # The provider speaks plain HTTP on loopback, which tokengate refuses unless told.
    return (
        '[server]\nlisten = "127.0.0.1:0"\nshutdown_grace_period = "5s"\n\n'
        f"[upstream]\nbase_url = {_toml_str(provider.issuer)}\nallow_insecure_http = true\n\n"
        "[clients]\nallow_public = true\n\n"
    )


class Tokengate:
    def __init__(self, proc: Process, addr: str):
        self.proc = proc
        self.addr = addr
        self.channel = grpc.insecure_channel(addr)
        grpc.channel_ready_future(self.channel).result(timeout=10)


def _start_tokengate(name: str, config_text: str, workdir: Path, forbidden: list[bytes]):
    config = workdir / "tokengate.toml"
    config.write_text(config_text)
    check = subprocess.run([str(binary()), "check-config", "--config", str(config)],
                           capture_output=True, text=True, timeout=30, env=_clean_env())
    assert check.returncode == 0, (
        f"tokengate check-config refused the {name} config ({check.returncode}): "
        f"{check.stdout}{check.stderr}\n{config_text}"
    )
    env = _clean_env()
    env["RUST_LOG"] = "info,tokengate=trace"  # every tokengate event, for the no-secret check
    proc = Process(name, [str(binary()), "serve", "--config", str(config), "--log-format", "json"], workdir, env)

    def listening(event):
        fields = event.get("fields") or {}
        return fields.get("addr") if fields.get("message") == "listening" else None

    try:
        addr = proc.wait_for_line(listening, STARTUP_DEADLINE_S)
    except BaseException:
        proc.kill()
        raise
    tg = Tokengate(proc, addr)
    yield tg
    tg.channel.close()
    code = proc.stop()
    assert code == 0, f"{name} exited with {code} after SIGTERM\n" + proc.diagnostics()
    logs = proc.logs().encode()
    for secret in forbidden:
        assert secret not in logs, f"a secret appeared in {name}'s logs"


@pytest.fixture(scope="session")
def tokengate(provider, tmp_path_factory):
    """tokengate with secret-based clients (Basic, post, a wrong secret)."""
    workdir = tmp_path_factory.mktemp("tokengate")
    post_secret_file = workdir / "tg-post.secret"
    post_secret_file.write_text(SECRETS["tg-post"] + "\n")
    config = _config_head(provider) + "\n".join([
        _client_toml("tg-basic", client_secret=SECRETS["tg-basic"], auth_method="client_secret_basic", default=True),
        _client_toml("tg-post", client_secret_file=post_secret_file, auth_method="client_secret_post"),
        _client_toml("tg-wrong-secret", client_secret=NOT_THE_SECRET, auth_method="client_secret_basic"),
        _client_toml("tg-device-short", client_secret=SECRETS["tg-device-short"], auth_method="client_secret_basic"),
    ])
    forbidden = [s.encode() for s in (SECRETS["tg-basic"], SECRETS["tg-post"], NOT_THE_SECRET,
                                      SECRETS["tg-device-short"], PASSWORD)]
    yield from _start_tokengate("tokengate", config, workdir, forbidden)


@pytest.fixture(scope="session")
def tokengate_jwt(provider, keys, tmp_path_factory):
    """tokengate with clients whose assertions it signs (private_key_jwt, client_secret_jwt)."""
    workdir = tmp_path_factory.mktemp("tokengate-jwt")
    entries = []
    for cid, alg, _, settings in _jwt_clients(keys, provider.issuer):
        entries.append(_client_toml(cid, auth_method="private_key_jwt", signing_alg=alg, **settings))
    # pk-rotate's key file starts with the key the provider does NOT trust.
    (keys["rot-old"].path.parent / "rotate.pem").write_bytes(keys["rot-old"].pem)
    entries.append(_client_toml("hs-client", auth_method="client_secret_jwt",
                                client_secret=SECRETS["hs-client"], signing_alg="HS256"))
    config = _config_head(provider) + "\n".join(entries)
    forbidden = [SECRETS["hs-client"].encode()] + [
        line.encode() for k in keys.values() for line in k.pem.decode().splitlines()[1:-1]
    ]
    yield from _start_tokengate("tokengate-jwt", config, workdir, forbidden)


@pytest.fixture(scope="session")
def stub(pb, tokengate):
    return pb.grpc.TokenServiceStub(tokengate.channel)


@pytest.fixture(scope="session")
def jwt_stub(pb, tokengate_jwt):
    return pb.grpc.TokenServiceStub(tokengate_jwt.channel)


# --------------------------------------------------------------------------- gRPC helpers


def _details(err: grpc.RpcError):
    """(ErrorInfo, RetryInfo or None) from grpc-status-details-bin."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no grpc-status-details-bin on {err.code()}: {err.details()!r}"
    info = retry = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
    assert info is not None, f"no google.rpc.ErrorInfo among {[d.type_url for d in status.details]}"
    assert info.domain == "tokengate"
    return info, retry


def expect_error(call, request, code: grpc.StatusCode, reason: str):
    """Calls, expects the gRPC code and ErrorInfo reason; returns (ErrorInfo, RetryInfo)."""
    with pytest.raises(grpc.RpcError) as excinfo:
        call(request, timeout=RPC_TIMEOUT_S)
    err = excinfo.value
    info, retry = _details(err)
    assert (err.code(), info.reason) == (code, reason), (
        f"expected {code.name} {reason}, got {err.code().name} {info.reason}: {err.details()!r} {dict(info.metadata)}"
    )
    return info, retry


def _duration_s(d) -> float:
    return d.seconds + d.nanos / 1e9


def assert_live_token(provider, token: str, client_id: str, sub: str | None = None) -> dict:
    """The provider itself says the access token is active and was issued to client_id."""
    assert token, "empty access_token"
    body = provider.introspect(token)
    assert body.get("active") is True, f"access token is not active at the provider: {body}"
    assert body.get("client_id") == client_id, body
    if sub is not None:
        assert body.get("sub") == sub, body
    return body


class Wire:
    """What reached the provider's token/revocation endpoints during a block."""

    def __init__(self, provider):
        self.provider = provider
        self.mark = len(provider.requests())

    def new(self) -> list[dict]:
        return self.provider.requests()[self.mark:]

    def one(self) -> dict:
        got = self.new()
        assert len(got) == 1, f"expected exactly one upstream request, got {len(got)}: {got}"
        return got[0]


# --------------------------------------------------------------------------- browser


class _Forms(HTMLParser):
    def __init__(self):
        super().__init__()
        self.forms: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"id": a.get("id"), "action": a.get("action") or "", "inputs": {}})
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1]["inputs"][a["name"]] = a.get("value") or ""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # hand every 3xx back to the caller


class Browser:
    """The end user: a cookie jar, no automatic redirects, the provider's devInteractions pages."""

    def __init__(self):
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()), _NoRedirect())

    def _send(self, url: str, form: dict | None = None):
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
        try:
            with self.opener.open(req, timeout=HTTP_TIMEOUT_S) as r:
                return r.status, r.headers, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read().decode("utf-8", "replace")

    def run(self, url: str, *, stop_at: str | None = None, abort_device: bool = False, max_steps: int = 20):
        """Follows redirects and submits the pages' forms (login: alice, consent: yes, device
        confirmation: continue, or abort when asked). Returns the first redirect to `stop_at`,
        or the final page's (status, body) when a page has no form."""
        status, headers, body = self._send(url)
        for _ in range(max_steps):
            if status in (301, 302, 303, 307, 308):
                url = urllib.parse.urljoin(url, headers["Location"])
                if stop_at and url.startswith(stop_at):
                    return url  # never contacted
                status, headers, body = self._send(url)
                continue
            parser = _Forms()
            parser.feed(body)
            if not parser.forms:
                return status, body
            form = parser.forms[0]
            fields = dict(form["inputs"])
            if "login" in fields:  # devInteractions sign-in: any login is accepted
                fields.update(login=USERNAME, password="any")
            aborting = abort_device and form["id"] == "op.deviceConfirmForm"
            if aborting:
                fields["abort"] = "yes"  # the page's [ Abort ] button
            url = urllib.parse.urljoin(url, form["action"])
            status, headers, body = self._send(url, fields)
            if aborting:
                return status, body  # the code-entry page again, saying the sign-in was interrupted
        raise AssertionError(f"no end after {max_steps} steps; last page {status}: {body[:500]}")


# --------------------------------------------------------------------------- JWT helpers


def _decode_jwt(token: str) -> tuple[dict, dict]:
    header, payload, _ = token.split(".")
    return json.loads(_b64u_decode(header)), json.loads(_b64u_decode(payload))


def _hs256_jwt(claims: dict, secret: str) -> str:
    signing_input = _b64u(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + _b64u(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64u(sig)


# =========================================================================== tests
# --------------------------------------------------------------------------- client_credentials


@pytest.mark.parametrize("client_id", ["tg-basic", "tg-post"])
def test_client_credentials(pb, stub, provider, client_id):
    m = pb.msg
    wire = Wire(provider)
    before = time.time()
    resp = stub.GetToken(
        m.GetTokenRequest(client_id=client_id, client_credentials=m.ClientCredentialsGrant(), scopes=["api", "billing"]),
        timeout=RPC_TIMEOUT_S,
    )
    assert resp.token_type == "Bearer"
    assert resp.expires_in.seconds == 600  # oidc-provider's ClientCredentials TTL
    assert before + 598 <= resp.expires_at.seconds <= time.time() + 602
    assert list(resp.scopes) == ["api", "billing"]
    assert resp.refresh_token == ""
    body = assert_live_token(provider, resp.access_token, client_id)
    assert body.get("scope") == "api billing"

    req = wire.one()
    assert req["path"] == TOKEN_PATH
    assert "tokengate" in (req["userAgent"] or "").lower()
    assert req["form"]["grant_type"] == "client_credentials"
    assert req["form"]["scope"] == "api billing"
    assert req["form"]["client_id"] == client_id
    if client_id == "tg-basic":
        expected = base64.b64encode(f"tg-basic:{SECRETS['tg-basic']}".encode()).decode()
        assert req["authorization"] == f"Basic {expected}"
        assert "client_secret" not in req["form"]
    else:
        assert req["authorization"] is None
        assert req["form"]["client_secret"] == SECRETS["tg-post"]


def test_default_client_is_used_without_client_id(pb, stub, provider):
    m = pb.msg
    resp = stub.GetToken(m.GetTokenRequest(client_credentials=m.ClientCredentialsGrant(), scopes=["api"]),
                         timeout=RPC_TIMEOUT_S)
    assert_live_token(provider, resp.access_token, "tg-basic")


def test_wrong_client_secret_is_failed_precondition_invalid_client(pb, stub):
    m = pb.msg
    info, _ = expect_error(
        stub.GetToken,
        m.GetTokenRequest(client_id="tg-wrong-secret", client_credentials=m.ClientCredentialsGrant(), scopes=["api"]),
        grpc.StatusCode.FAILED_PRECONDITION, "INVALID_CLIENT",
    )
    md = dict(info.metadata)
    assert md.get("oauthError") == "invalid_client"
    assert md.get("upstreamHttpStatus") == "401"
    assert md.get("clientId") == "tg-wrong-secret"
    assert md.get("grantType") == "client_credentials"
    assert NOT_THE_SECRET not in json.dumps(md) and SECRETS["tg-wrong-secret"] not in json.dumps(md)


OTHER_REFUSALS = {
    # name: (request kwargs, code, reason, the provider's OAuth error)
    # oidc-provider has no ivr_pin grant.
    "unsupported_grant_type": (lambda m, p: {"ivr_pin": m.IvrPinGrant(ivr_pin="1234")},
                               grpc.StatusCode.UNIMPLEMENTED, "UNSUPPORTED_GRANT_TYPE", "unsupported_grant_type"),
    # tg-post is registered without the otp grant; oidc-provider answers that with invalid_request
    # ("requested grant type is not allowed for this client"), not unauthorized_client.
    "invalid_request": (lambda m, p: {"client_id": "tg-post", "otp": m.OtpGrant(code=OTP_CODE)},
                        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", "invalid_request"),
    # caller-hs may only ask for `api`; `billing` is a scope the provider knows but does not allow it.
    "invalid_scope": (lambda m, p: {"client_id": "caller-hs", "client_credentials": m.ClientCredentialsGrant(),
                                    "client_assertion": m.ClientAssertion(assertion=_caller_assertion(p, SECRETS["caller-hs"])),
                                    "scopes": ["billing"]},
                      grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SCOPE", "invalid_scope"),
}


@pytest.mark.parametrize("name", list(OTHER_REFUSALS))
def test_other_upstream_refusals(pb, stub, provider, name):
    build, code, reason, oauth_error = OTHER_REFUSALS[name]
    info, _ = expect_error(stub.GetToken, pb.msg.GetTokenRequest(**build(pb.msg, provider)), code, reason)
    assert dict(info.metadata).get("oauthError") == oauth_error


# --------------------------------------------------------------------------- authorization_code + PKCE


def _pkce_pair() -> tuple[str, str]:
    verifier = _b64u(secrets.token_bytes(32))
    challenge = _b64u(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge


def _authorization_code(provider, challenge: str) -> str:
    """Signs alice in through the provider's devInteractions and returns the code."""
    state = secrets.token_hex(8)
    query = urllib.parse.urlencode({
        "client_id": "tg-basic", "response_type": "code", "scope": "openid offline_access api",
        "prompt": "consent", "redirect_uri": REDIRECT_URI, "state": state,
        "code_challenge": challenge, "code_challenge_method": "S256",
    })
    location = Browser().run(f"{provider.issuer}/auth?{query}", stop_at=REDIRECT_URI)
    params = urllib.parse.parse_qs(urllib.parse.urlparse(location).query)
    assert params.get("state") == [state], location
    assert "code" in params, f"no code in the redirect: {location}"
    return params["code"][0]


def test_authorization_code_with_pkce(pb, stub, provider):
    m = pb.msg
    verifier, challenge = _pkce_pair()
    code = _authorization_code(provider, challenge)
    wire = Wire(provider)
    resp = stub.GetToken(
        m.GetTokenRequest(authorization_code=m.AuthorizationCodeGrant(code=code, redirect_uri=REDIRECT_URI,
                                                                      code_verifier=verifier)),
        timeout=RPC_TIMEOUT_S,
    )
    assert resp.refresh_token, "offline_access was granted, so a refresh token is due"
    assert resp.id_token.count(".") == 2, "openid was granted, so an id_token (JWT) is due"
    assert set(resp.scopes) >= {"openid", "offline_access"}
    assert resp.expires_in.seconds > 0
    assert_live_token(provider, resp.access_token, "tg-basic", sub=USERNAME)
    form = wire.one()["form"]
    assert (form["grant_type"], form["code"], form["redirect_uri"], form["code_verifier"]) == (
        "authorization_code", code, REDIRECT_URI, verifier)


def test_authorization_code_with_wrong_verifier_is_invalid_grant(pb, stub, provider):
    m = pb.msg
    _, challenge = _pkce_pair()
    code = _authorization_code(provider, challenge)
    wrong_verifier, _ = _pkce_pair()
    info, _ = expect_error(
        stub.GetToken,
        m.GetTokenRequest(authorization_code=m.AuthorizationCodeGrant(code=code, redirect_uri=REDIRECT_URI,
                                                                      code_verifier=wrong_verifier)),
        grpc.StatusCode.UNAUTHENTICATED, "INVALID_GRANT",
    )
    md = dict(info.metadata)
    assert md.get("oauthError") == "invalid_grant"
    assert md.get("grantType") == "authorization_code"
    assert md.get("upstreamHttpStatus") == "400"


# --------------------------------------------------------------------------- custom grants


def _password_tokens(pb, stub):
    m = pb.msg
    return stub.GetToken(m.GetTokenRequest(password=m.PasswordGrant(username=USERNAME, password=PASSWORD)),
                         timeout=RPC_TIMEOUT_S)


CUSTOM_GRANTS = {
    # arm: (build grant kwargs, grant_type on the wire, form fields on the wire, account the provider binds)
    "password": (lambda m: {"password": m.PasswordGrant(username=USERNAME, password=PASSWORD)},
                 "password", {"username": USERNAME, "password": PASSWORD}, USERNAME),
    "otp": (lambda m: {"otp": m.OtpGrant(code=OTP_CODE)}, "otp", {"code": OTP_CODE}, "otp-user"),
    "jwt_bearer": (lambda m: {"jwt_bearer": m.JwtBearerGrant(assertion=JWT_BEARER_ASSERTION)},
                   "urn:ietf:params:oauth:grant-type:jwt-bearer", {"assertion": JWT_BEARER_ASSERTION}, "jwt-user"),
    "partner_jwt": (lambda m: {"partner_jwt": m.PartnerJwtGrant(assertion=PARTNER_JWT_ASSERTION)},
                    "partner_jwt", {"assertion": PARTNER_JWT_ASSERTION}, "partner-user"),
}


@pytest.mark.parametrize("arm", list(CUSTOM_GRANTS))
def test_custom_grant(pb, stub, provider, arm):
    build, grant_type, fields, account = CUSTOM_GRANTS[arm]
    wire = Wire(provider)
    resp = stub.GetToken(pb.msg.GetTokenRequest(**build(pb.msg)), timeout=RPC_TIMEOUT_S)
    assert resp.token_type == "Bearer"
    assert resp.expires_in.seconds == 3600
    assert resp.refresh_token
    assert list(resp.scopes) == ["openid", "offline_access"]
    assert_live_token(provider, resp.access_token, "tg-basic", sub=account)
    form = wire.one()["form"]
    assert form["grant_type"] == grant_type
    for name, value in fields.items():
        assert form[name] == value, f"{name}: {form}"


BAD_CUSTOM_GRANTS = {
    "password": lambda m: {"password": m.PasswordGrant(username=USERNAME, password="not-wonderland")},
    "otp": lambda m: {"otp": m.OtpGrant(code="000000")},
    "jwt_bearer": lambda m: {"jwt_bearer": m.JwtBearerGrant(assertion="forged")},
    "partner_jwt": lambda m: {"partner_jwt": m.PartnerJwtGrant(assertion="forged")},
}


@pytest.mark.parametrize("arm", list(BAD_CUSTOM_GRANTS))
def test_custom_grant_with_bad_credentials_is_invalid_grant(pb, stub, arm):
    info, _ = expect_error(stub.GetToken, pb.msg.GetTokenRequest(**BAD_CUSTOM_GRANTS[arm](pb.msg)),
                           grpc.StatusCode.UNAUTHENTICATED, "INVALID_GRANT")
    md = dict(info.metadata)
    assert md.get("oauthError") == "invalid_grant"
    assert md.get("grantType") == arm
    assert md.get("clientId") == "tg-basic"


# --------------------------------------------------------------------------- refresh + revoke


def test_refresh_token_rotation(pb, stub, provider):
    m = pb.msg
    first = _password_tokens(pb, stub)
    wire = Wire(provider)
    second = stub.GetToken(m.GetTokenRequest(refresh_token=m.RefreshTokenGrant(refresh_token=first.refresh_token)),
                           timeout=RPC_TIMEOUT_S)
    assert wire.one()["form"] == {"grant_type": "refresh_token", "refresh_token": first.refresh_token,
                                  "client_id": "tg-basic"}
    assert second.refresh_token and second.refresh_token != first.refresh_token, "rotation is on"
    assert second.access_token != first.access_token

    # The new pair works: the access token is live, the refresh token refreshes.
    assert_live_token(provider, second.access_token, "tg-basic", sub=USERNAME)
    third = stub.GetToken(m.GetTokenRequest(refresh_token=m.RefreshTokenGrant(refresh_token=second.refresh_token)),
                          timeout=RPC_TIMEOUT_S)
    assert_live_token(provider, third.access_token, "tg-basic", sub=USERNAME)

    # The rotated-out refresh token is single-use.
    info, _ = expect_error(stub.GetToken,
                           m.GetTokenRequest(refresh_token=m.RefreshTokenGrant(refresh_token=first.refresh_token)),
                           grpc.StatusCode.UNAUTHENTICATED, "INVALID_GRANT")
    assert dict(info.metadata).get("grantType") == "refresh_token"
    assert first.refresh_token not in json.dumps(dict(info.metadata))


def test_revoke_token_then_refresh_is_invalid_grant(pb, stub, provider):
    m = pb.msg
    tokens = _password_tokens(pb, stub)
    wire = Wire(provider)
    stub.RevokeToken(m.RevokeTokenRequest(token=tokens.refresh_token), timeout=RPC_TIMEOUT_S)
    req = wire.one()
    assert req["path"] == REVOKE_PATH
    assert req["form"].get("token") == tokens.refresh_token
    assert req["authorization"], "revocation authenticates the client like GetToken"

    expect_error(stub.GetToken,
                 m.GetTokenRequest(refresh_token=m.RefreshTokenGrant(refresh_token=tokens.refresh_token)),
                 grpc.StatusCode.UNAUTHENTICATED, "INVALID_GRANT")


# --------------------------------------------------------------------------- device flow


class Device:
    """A device that started RFC 8628 at the provider and polls through tokengate."""

    def __init__(self, pb, stub, provider, client_id: str = "tg-basic"):
        self.pb, self.stub, self.client_id = pb, stub, client_id
        status, body = provider.post(DEVICE_AUTH_PATH, {"client_id": client_id, "scope": "openid api"}, client_id)
        assert status == 200, body
        assert body["interval"] == DEVICE_POLL_INTERVAL_S
        self.start = body
        self.last_poll: float | None = None

    def poll(self):
        m = self.pb.msg
        self.last_poll = time.monotonic()
        return self.stub.GetToken(
            m.GetTokenRequest(client_id=self.client_id, device_code=m.DeviceCodeGrant(device_code=self.start["device_code"])),
            timeout=RPC_TIMEOUT_S,
        )

    def poll_politely(self):
        """Polls no faster than the interval the provider asked for."""
        if self.last_poll is not None:
            wait = self.last_poll + DEVICE_POLL_INTERVAL_S + 0.1 - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        return self.poll()

    def poll_until(self, done_reason: str | None, deadline_s: float):
        """Polls politely while the answer is AUTHORIZATION_PENDING; returns the token response
        (done_reason None) or the RpcError whose reason is done_reason."""
        deadline = time.monotonic() + deadline_s
        seen = []
        while time.monotonic() < deadline:
            try:
                resp = self.poll_politely()
            except grpc.RpcError as err:
                info, _ = _details(err)
                seen.append(info.reason)
                if info.reason == done_reason:
                    return err, info, seen
                assert info.reason == "AUTHORIZATION_PENDING", f"{err.code()} {info.reason}: {err.details()}"
                continue
            assert done_reason is None, f"got tokens while waiting for {done_reason}"
            return resp, None, seen
        raise AssertionError(f"no {done_reason or 'tokens'} within {deadline_s}s; saw {seen}")


def test_device_code_authorization_pending(pb, stub, provider):
    device = Device(pb, stub, provider)
    wire = Wire(provider)
    with pytest.raises(grpc.RpcError) as excinfo:
        device.poll()
    info, retry = _details(excinfo.value)
    assert (excinfo.value.code(), info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "AUTHORIZATION_PENDING")
    assert retry is not None and _duration_s(retry.retry_delay) == 5.0, "RetryInfo(5 s) per the contract"
    assert dict(info.metadata).get("grantType") == "device_code"
    form = wire.one()["form"]
    assert (form["grant_type"], form["device_code"]) == (DEVICE_GRANT, device.start["device_code"])


def test_device_code_slow_down(pb, stub, provider):
    device = Device(pb, stub, provider)
    with pytest.raises(grpc.RpcError):
        device.poll()  # pending
    with pytest.raises(grpc.RpcError) as excinfo:
        device.poll()  # again at once: faster than the 1 s interval
    info, retry = _details(excinfo.value)
    assert (excinfo.value.code(), info.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SLOW_DOWN"), (
        f"{excinfo.value.code()} {info.reason}")
    assert dict(info.metadata).get("oauthError") == "slow_down"
    assert retry is not None and _duration_s(retry.retry_delay) > 0, "SLOW_DOWN carries RetryInfo"


def test_device_code_access_denied(pb, stub, provider):
    device = Device(pb, stub, provider)
    status, page = Browser().run(device.start["verification_uri_complete"], abort_device=True)
    assert "The Sign-in request was interrupted" in page, f"the user did not abort: {status} {page[:300]}"
    err, info, seen = device.poll_until("ACCESS_DENIED", deadline_s=10)
    assert seen == ["ACCESS_DENIED"], f"the abort came before the first poll: {seen}"
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert dict(info.metadata).get("oauthError") == "access_denied"


def test_device_code_expired_token(pb, stub, provider):
    device = Device(pb, stub, provider, client_id="tg-device-short")
    assert device.start["expires_in"] == SHORT_DEVICE_CODE_TTL_S
    err, info, seen = device.poll_until("EXPIRED_TOKEN", deadline_s=SHORT_DEVICE_CODE_TTL_S + 10)
    assert seen[0] == "AUTHORIZATION_PENDING", f"the first poll came before expiry: {seen}"
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(info.metadata).get("oauthError") == "expired_token"


def test_device_code_success(pb, stub, provider):
    device = Device(pb, stub, provider)
    with pytest.raises(grpc.RpcError) as excinfo:
        device.poll()
    assert _details(excinfo.value)[0].reason == "AUTHORIZATION_PENDING"
    status, page = Browser().run(device.start["verification_uri_complete"])
    assert status == 200 and "success" in page.lower(), f"device approval did not finish: {status} {page[:300]}"
    resp = device.poll_politely()  # approved before this poll: tokens at once
    assert_live_token(provider, resp.access_token, "tg-basic", sub=USERNAME)
    assert "openid" in resp.scopes


# --------------------------------------------------------------------------- caller-supplied assertion


def _caller_assertion(provider, secret: str) -> str:
    now = int(time.time())
    return _hs256_jwt({"iss": "caller-hs", "sub": "caller-hs", "aud": provider.token_url,
                       "iat": now, "exp": now + 60, "jti": secrets.token_hex(16)}, secret)


def test_caller_supplied_client_assertion(pb, stub, provider):
    m = pb.msg
    wire = Wire(provider)
    assertion = _caller_assertion(provider, SECRETS["caller-hs"])
    resp = stub.GetToken(m.GetTokenRequest(client_id="caller-hs", client_assertion=m.ClientAssertion(assertion=assertion),
                                           client_credentials=m.ClientCredentialsGrant(), scopes=["api"]),
                         timeout=RPC_TIMEOUT_S)
    assert_live_token(provider, resp.access_token, "caller-hs")
    req = wire.one()
    assert req["authorization"] is None
    assert req["form"]["client_assertion"] == assertion
    assert req["form"]["client_assertion_type"] == CLIENT_ASSERTION_TYPE
    assert req["form"]["client_id"] == "caller-hs"


def test_caller_supplied_bad_assertion_is_unauthenticated_invalid_client(pb, stub, provider):
    m = pb.msg
    assertion = _caller_assertion(provider, "not-the-shared-secret-of-caller-hs-client")
    info, _ = expect_error(
        stub.GetToken,
        m.GetTokenRequest(client_id="caller-hs", client_assertion=m.ClientAssertion(assertion=assertion),
                          client_credentials=m.ClientCredentialsGrant(), scopes=["api"]),
        grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT",
    )
    assert dict(info.metadata).get("oauthError") == "invalid_client"


# --------------------------------------------------------------------------- assertions signed by tokengate


SIGNED = {
    # client_id: (alg, kid header expected)
    "pk-rs": ("RS256", None),
    "pk-es": ("ES256", "es-k1"),
    "pk-ps": ("PS256", "ps-k1"),  # key file is PKCS#1 ("BEGIN RSA PRIVATE KEY")
    "hs-client": ("HS256", None),
}


def _signed_cc(pb, jwt_stub, client_id):
    m = pb.msg
    return jwt_stub.GetToken(m.GetTokenRequest(client_id=client_id, client_credentials=m.ClientCredentialsGrant(),
                                               scopes=["api"]), timeout=RPC_TIMEOUT_S)


def _check_assertion_form(req: dict, client_id: str) -> tuple[dict, dict]:
    form = req["form"]
    assert req["authorization"] is None, "a signed assertion replaces the Basic header"
    assert "client_secret" not in form
    assert form["client_id"] == client_id
    assert form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
    return _decode_jwt(form["client_assertion"])


@pytest.mark.parametrize("client_id", list(SIGNED))
def test_signed_client_assertion(pb, jwt_stub, provider, client_id):
    alg, kid = SIGNED[client_id]
    jtis = []
    for _ in range(2):
        wire = Wire(provider)
        before = int(time.time())
        resp = _signed_cc(pb, jwt_stub, client_id)
        assert_live_token(provider, resp.access_token, client_id)
        header, claims = _check_assertion_form(wire.one(), client_id)
        assert header["alg"] == alg
        assert header.get("kid") == kid
        assert claims["iss"] == client_id and claims["sub"] == client_id
        assert claims["aud"] in (provider.token_url, [provider.token_url]), claims["aud"]
        assert before + 30 <= claims["exp"] <= int(time.time()) + 120, f"exp is not ~60 s away: {claims}"
        assert claims.get("jti")
        jtis.append(claims["jti"])
    assert jtis[0] != jtis[1], "every assertion needs a unique jti"


def test_signed_assertion_uses_configured_audience(pb, jwt_stub, provider):
    wire = Wire(provider)
    resp = _signed_cc(pb, jwt_stub, "pk-es-aud")
    assert_live_token(provider, resp.access_token, "pk-es-aud")
    _, claims = _check_assertion_form(wire.one(), "pk-es-aud")
    assert claims["aud"] in (provider.issuer, [provider.issuer])

    wire = Wire(provider)
    m = pb.msg
    expect_error(jwt_stub.GetToken, m.GetTokenRequest(client_id="pk-es-badaud",
                                                      client_credentials=m.ClientCredentialsGrant(), scopes=["api"]),
                 grpc.StatusCode.FAILED_PRECONDITION, "INVALID_CLIENT")
    _, claims = _check_assertion_form(wire.one(), "pk-es-badaud")
    assert claims["aud"] in ("https://elsewhere.example/token", ["https://elsewhere.example/token"])


def test_signed_assertion_sends_configured_kid(pb, jwt_stub, provider):
    # Same key as pk-es, but a kid the provider's JWKS lacks: refused, so the kid is on the wire
    # and the provider selects the key by it.
    m = pb.msg
    wire = Wire(provider)
    expect_error(jwt_stub.GetToken, m.GetTokenRequest(client_id="pk-es-badkid",
                                                      client_credentials=m.ClientCredentialsGrant(), scopes=["api"]),
                 grpc.StatusCode.FAILED_PRECONDITION, "INVALID_CLIENT")
    header, _ = _check_assertion_form(wire.one(), "pk-es-badkid")
    assert header.get("kid") == "no-such-kid"


def test_private_key_file_reload(pb, jwt_stub, provider, keys):
    m = pb.msg
    request = m.GetTokenRequest(client_id="pk-rotate", client_credentials=m.ClientCredentialsGrant(), scopes=["api"])
    key_file = keys["rot-old"].path.parent / "rotate.pem"

    # The provider trusts only the new key, tokengate still holds the old one.
    expect_error(jwt_stub.GetToken, request, grpc.StatusCode.FAILED_PRECONDITION, "INVALID_CLIENT")

    # Rotate the key the way a Secret update does: the new content appears at the same path.
    tmp = key_file.with_suffix(".tmp")
    tmp.write_bytes(keys["rot-new"].pem)
    os.replace(tmp, key_file)

    deadline = time.monotonic() + KEY_RELOAD_DEADLINE_S
    failures = []
    while True:
        try:
            resp = jwt_stub.GetToken(request, timeout=RPC_TIMEOUT_S)
            break
        except grpc.RpcError as err:
            info, _ = _details(err)
            failures.append(info.reason)
            assert info.reason == "INVALID_CLIENT", f"{err.code()} {info.reason}: {err.details()}"
            if time.monotonic() > deadline:
                raise AssertionError(f"tokengate did not pick up the new key within {KEY_RELOAD_DEADLINE_S}s "
                                     f"({len(failures)} refused calls)")
            time.sleep(0.2)
    assert_live_token(provider, resp.access_token, "pk-rotate")
