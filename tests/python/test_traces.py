"""Traces from the real binary, received by an OTLP collector that lives in this test.

The collector is ~20 lines per protocol: a grpcio server with opentelemetry-proto's
TraceService stubs (OTLP/gRPC), and an http.server that decodes the same protobuf from
`POST /v1/traces` (OTLP/http). Both listen on 127.0.0.1 port 0. Calls carry a known W3C
`traceparent`; the tests check that tokengate continues that trace, that the upstream POST
is a child span with its method, status and RingCentral request id, that an unsampled
caller exports nothing, that no secret reaches any exported byte, and that an unreachable
collector neither blocks calls nor floods the logs. Over TLS (a throwaway CA made here), an
https collector is trusted through OTEL_EXPORTER_OTLP_(TRACES_)CERTIFICATE and not without it.

Nothing sleeps: every wait is on a condition with a deadline.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.trace.v1 import trace_pb2
from tokengate_process import Tokengate, binary, generate_stubs

STARTUP_DEADLINE_S = 30.0
SHUTDOWN_DEADLINE_S = 15.0
EXPORT_DEADLINE_S = 20.0
RPC_TIMEOUT_S = 10.0

BASIC_APP = "tr-basic"
BASIC_SECRET = "TRSECRET-client-basic-1q"
POST_APP = "tr-post"
POST_SECRET = "TRSECRET-client-post-2w"
RIGHT_PASSWORD = "TRSECRET-password-3e"
WRONG_PASSWORD = "TRSECRET-wrong-password-4r"
PIN = "TRSECRET-pin-5t"
AUTH_CODE = "TRSECRET-auth-code-6y"
CODE_VERIFIER = "TRSECRET-code-verifier-7u"
ASSERTION = "TRSECRET-jwt-assertion-8i"
CLIENT_ASSERTION = "TRSECRET-client-assertion-9o"
REFRESH_TOKEN_IN = "TRSECRET-refresh-in-0p"
IVR_PIN = "TRSECRET-ivr-pin-1a"
REVOKED_TOKEN = "TRSECRET-revoked-2s"
ACCESS_TOKEN = "TRSECRET-access-token-3d"
REFRESH_TOKEN_OUT = "TRSECRET-refresh-out-4f"
# A caller-chosen client_id: not a secret, but no span may carry it (only "public").
RAW_CLIENT_ID = "raw-caller-chosen-id-Zq9"

SECRETS = (
    BASIC_SECRET,
    POST_SECRET,
    RIGHT_PASSWORD,
    WRONG_PASSWORD,
    PIN,
    AUTH_CODE,
    CODE_VERIFIER,
    ASSERTION,
    CLIENT_ASSERTION,
    REFRESH_TOKEN_IN,
    IVR_PIN,
    REVOKED_TOKEN,
    ACCESS_TOKEN,
    REFRESH_TOKEN_OUT,
    base64.b64encode(f"{BASIC_APP}:{BASIC_SECRET}".encode()).decode(),
    RAW_CLIENT_ID,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"

SERVER = trace_pb2.Span.SpanKind.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SpanKind.SPAN_KIND_CLIENT


def traceparent(trace_id: str, sampled: bool = True) -> str:
    return f"00-{trace_id}-{CALLER_SPAN_ID}-{'01' if sampled else '00'}"


def new_trace_id() -> str:
    return os.urandom(16).hex()


# --------------------------------------------------------------------------- private CA


class Pki:
    """A throwaway CA and the certificate it signed for 127.0.0.1 (an IP SAN), as PEM files
    in `directory`: ca.pem (what tokengate is told to trust), server.pem and server.key."""

    def __init__(self, directory: Path, name: str):
        now = datetime.datetime.now(datetime.timezone.utc)
        valid_from, valid_to = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from)
            .not_valid_after(valid_to)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )

        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from)
            .not_valid_after(valid_to)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )

        self.ca_path = directory / "ca.pem"
        self.cert_path = directory / "server.pem"
        self.key_path = directory / "server.key"
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.cert_path.write_bytes(self.cert_pem)
        self.key_path.write_bytes(self.key_pem)


# --------------------------------------------------------------------------- collectors


class Collector:
    """What an OTLP receiver got: the raw requests, and a way to wait for spans."""

    def __init__(self):
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.raw: list[bytes] = []
        # Each export's headers (HTTP) or metadata (gRPC), lower-case names.
        self.headers: list[dict[str, str]] = []
        self._cond = threading.Condition()

    def received(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._cond:
            self.requests.append(request)
            self.raw.append(request.SerializeToString())
            self._cond.notify_all()

    def spans(self) -> list[tuple]:
        """Every (resource, span) received so far."""
        with self._cond:
            requests = list(self.requests)
        return [
            (rs.resource, span)
            for request in requests
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]

    def wait_for(self, predicate, what: str) -> list[tuple]:
        """Waits until predicate(spans) is true; returns the spans."""
        deadline = time.monotonic() + EXPORT_DEADLINE_S
        with self._cond:
            while True:
                spans = [
                    (rs.resource, span)
                    for request in self.requests
                    for rs in request.resource_spans
                    for ss in rs.scope_spans
                    for span in ss.spans
                ]
                if predicate(spans):
                    return spans
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {what} within {EXPORT_DEADLINE_S}s; got {len(spans)} spans"
                self._cond.wait(remaining)


class GrpcCollector(Collector):
    """OTLP/gRPC: TraceService/Export; over TLS with `tls`'s server certificate."""

    def __init__(self, tls: Pki | None = None):
        super().__init__()
        collector = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 (generated name)
                collector.headers.append(dict(context.invocation_metadata()))
                collector.received(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            self.endpoint = f"http://127.0.0.1:{self.port}"
        else:
            credentials = grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)])
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
            self.endpoint = f"https://127.0.0.1:{self.port}"
        self.protocol = "grpc"
        self.server.start()

    def stop(self):
        self.server.stop(grace=None)


class HttpCollector(Collector):
    """OTLP/http with protobuf bodies: POST /v1/traces; over TLS with `tls`'s server
    certificate."""

    def __init__(self, tls: Pki | None = None):
        super().__init__()
        collector = self
        self.paths: list[tuple[str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 (http.server naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                collector.paths.append((self.path, self.headers.get("Content-Type", "")))
                collector.headers.append({k.lower(): v for k, v in self.headers.items()})
                collector.received(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        # The base URL, as OTEL_EXPORTER_OTLP_ENDPOINT gives it; tokengate adds /v1/traces.
        self.endpoint = f"http://127.0.0.1:{self.port}"
        if tls is not None:
            # Handshakes run in accept(); one the client refuses is an OSError that
            # serve_forever drops, as a collector would.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls.cert_path, tls.key_path)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.endpoint = f"https://127.0.0.1:{self.port}"
        self.protocol = "http/protobuf"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class Unreachable:
    """A port that accepts and at once closes every connection: a collector that is down.
    It counts connections, so a test can see the exporter try again without sleeping."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()
            with self._cond:
                self.accepted += 1
                self._cond.notify_all()

    def wait_accepted(self, count: int) -> None:
        deadline = time.monotonic() + EXPORT_DEADLINE_S
        with self._cond:
            while self.accepted < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"the exporter connected {self.accepted} times, not {count}"
                self._cond.wait(remaining)

    def stop(self):
        self.sock.close()


# --------------------------------------------------------------------------- upstream


class Upstream:
    """RingCentral's token and revoke endpoints. Every answer carries a fresh RCRequestId,
    remembered by the grant it answered."""

    def __init__(self):
        self.request_ids: list[tuple[str, str]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                form = urllib.parse.parse_qs(raw, keep_blank_values=True)
                grant = (form.get("grant_type") or ["revoke"])[0]
                request_id = f"rc-{os.urandom(6).hex()}"
                upstream.request_ids.append((grant, request_id))
                if self.path.endswith("/revoke"):
                    self._reply(200, {}, request_id)
                elif grant == "password" and form.get("password") != [RIGHT_PASSWORD]:
                    # Echoes what was sent, as upstreams do: the echo must not reach a span.
                    echo = f"bad credentials {form.get('password')} {WRONG_PASSWORD} {PIN}"
                    self._reply(
                        400,
                        {"error": "invalid_grant", "error_description": echo,
                         "errors": [{"errorCode": "OAU-140", "message": echo}]},
                        request_id,
                    )
                else:
                    self._reply(
                        200,
                        {"access_token": ACCESS_TOKEN, "token_type": "bearer", "expires_in": 3600,
                         "refresh_token": REFRESH_TOKEN_OUT, "refresh_token_expires_in": 604800,
                         "scope": "ReadAccounts"},
                        request_id,
                    )

            def _reply(self, status, body, request_id):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("RCRequestId", request_id)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pb(tmp_path_factory):
    return generate_stubs(tmp_path_factory.mktemp("stubs"))


@pytest.fixture(scope="module")
def upstream():
    up = Upstream()
    yield up
    up.stop()


def config_text(upstream_port: int, telemetry: str, grace: str = "5s") -> str:
    return f"""\
[server]
listen = "127.0.0.1:0"
shutdown_grace_period = "{grace}"

[upstream]
base_url = "http://127.0.0.1:{upstream_port}"
allow_insecure_http = true

[clients]
allow_public = true

[[clients.registered]]
client_id = "{BASIC_APP}"
client_secret = "{BASIC_SECRET}"
default = true

[[clients.registered]]
client_id = "{POST_APP}"
client_secret = "{POST_SECRET}"
auth_method = "client_secret_post"

[telemetry]
{telemetry}
"""


class Running:
    """A started tokengate and a stub for it; stop() checks it exits cleanly."""

    def __init__(self, pb, tmp_path, config: str, extra_env: dict | None = None,
                 log_format: str = "json"):
        path = tmp_path / "tokengate.toml"
        path.write_text(config)
        # Export batches every 100 ms instead of every 5 s, so tests wait less.
        env = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
        env.update(extra_env or {})
        self.tg = Tokengate(binary(), path, tmp_path, env, log_format)
        try:
            addr = self.tg.wait_listening(STARTUP_DEADLINE_S)
        except BaseException:
            self.tg.proc.kill()
            self.tg.proc.wait()
            raise
        self.channel = grpc.insecure_channel(addr)
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.stub = pb.grpc.TokenServiceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        code = self.tg.stop(SHUTDOWN_DEADLINE_S)
        assert code == 0, f"tokengate exited with {code}\n" + self.tg.diagnostics()


@pytest.fixture(params=["grpc", "http/protobuf"])
def collector(request):
    c = GrpcCollector() if request.param == "grpc" else HttpCollector()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"), "collector")


@pytest.fixture(params=["grpc", "http/protobuf"])
def tls_collector(request, pki):
    c = GrpcCollector(tls=pki) if request.param == "grpc" else HttpCollector(tls=pki)
    yield c
    c.stop()


# --------------------------------------------------------------------------- helpers


def attrs(item) -> dict:
    out = {}
    for kv in item.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind) if kind else None
    return out


def password_request(pb, password: str, scope: str, client_id: str = ""):
    m = pb.msg
    return m.GetTokenRequest(
        client_id=client_id,
        password=m.PasswordGrant(username="alice@example.com", password=password),
        scopes=[scope],
    )


def of_trace(spans, trace_id: str) -> list:
    wanted = bytes.fromhex(trace_id)
    return [span for _, span in spans if span.trace_id == wanted]


# --------------------------------------------------------------------------- tests


def test_the_callers_trace_is_continued_down_to_the_upstream_post(pb, tmp_path, upstream, collector):
    run = Running(
        pb,
        tmp_path,
        config_text(
            upstream.port,
            f'otlp_endpoint = "{collector.endpoint}"\notlp_protocol = "{collector.protocol}"\n'
            'service_name = "tokengate-under-test"',
        ),
    )
    try:
        metadata = [("traceparent", traceparent(TRACE_ID)), ("tracestate", "vendor=abc")]
        response = run.stub.GetToken(
            password_request(pb, RIGHT_PASSWORD, f"Traced{collector.port}"),
            metadata=metadata,
            timeout=RPC_TIMEOUT_S,
        )
        assert response.access_token == ACCESS_TOKEN
        request_id = upstream.request_ids[-1][1]

        spans = collector.wait_for(
            lambda spans: len(of_trace(spans, TRACE_ID)) >= 2, "server and upstream spans"
        )
    finally:
        run.stop()

    traced = of_trace(spans, TRACE_ID)
    servers = [s for s in traced if s.kind == SERVER]
    clients = [s for s in traced if s.kind == CLIENT]
    assert len(servers) == 1, traced
    assert len(clients) == 1, traced
    server, client = servers[0], clients[0]

    # The call's span is the caller's child, in the caller's trace, with its tracestate.
    assert server.name == "tokengate.v1.TokenService/GetToken"
    assert server.parent_span_id == bytes.fromhex(CALLER_SPAN_ID)
    assert server.trace_state == "vendor=abc"
    server_attrs = attrs(server)
    assert server_attrs["grant_type"] == "password"
    assert server_attrs["client_id"] == BASIC_APP
    assert server_attrs["rpc.grpc.status_code"] == 0
    assert server_attrs["upstream_status"] == 200

    # The upstream POST is the call's child, with its method, status and request id.
    assert client.parent_span_id == server.span_id
    assert client.name == "POST"
    client_attrs = attrs(client)
    assert client_attrs["http.request.method"] == "POST"
    assert client_attrs["http.response.status_code"] == 200
    assert client_attrs["http.response.header.rcrequestid"] == request_id
    assert client_attrs["server.address"] == "127.0.0.1"
    assert client_attrs["url.path"] == "/restapi/oauth/token"

    resources = [resource for resource, span in spans if span.trace_id == bytes.fromhex(TRACE_ID)]
    assert attrs(resources[0])["service.name"] == "tokengate-under-test"

    if isinstance(collector, HttpCollector):
        assert {path for path, _ in collector.paths} == {"/v1/traces"}
        assert {kind for _, kind in collector.paths} == {"application/x-protobuf"}

    # The JSON log lines of the call carry the caller's trace id and the call's span id.
    lines = [
        e for e in run.tg.events()
        if e.get("fields", {}).get("message") == "call succeeded" and e.get("trace_id") == TRACE_ID
    ]
    assert len(lines) == 1, run.tg.diagnostics()
    assert lines[0]["span_id"] == server.span_id.hex()


def test_text_logs_still_export_and_leave_out_the_span_only_fields(pb, tmp_path, upstream):
    # Without a collector, text logs leave the OpenTelemetry layer out (nothing would read
    # its ids); with one, the layer must be there whatever the log format.
    collector = GrpcCollector()
    run = Running(
        pb,
        tmp_path,
        config_text(upstream.port, f'otlp_endpoint = "{collector.endpoint}"'),
        log_format="text",
    )
    try:
        response = run.stub.GetToken(
            password_request(pb, RIGHT_PASSWORD, "TextLogs"),
            metadata=[("traceparent", traceparent(TRACE_ID))],
            timeout=RPC_TIMEOUT_S,
        )
        assert response.access_token == ACCESS_TOKEN
        spans = collector.wait_for(
            lambda spans: len(of_trace(spans, TRACE_ID)) >= 2, "server and upstream spans"
        )
    finally:
        run.stop()
        collector.stop()
    assert {span.name for span in of_trace(spans, TRACE_ID)} == {
        "tokengate.v1.TokenService/GetToken", "POST"}

    # The call's text line names the span once, with its fields and not otel.name/otel.kind.
    lines = [line for line in run.tg.lines if line.endswith("tokengate::service: call succeeded")]
    assert len(lines) == 1, run.tg.diagnostics()
    assert f'GetToken{{grant_type="password" client_id="{BASIC_APP}" latency=' in lines[0], lines[0]
    assert "otel." not in run.tg.logs(), run.tg.diagnostics()


def test_an_unsampled_caller_exports_nothing_for_its_call(pb, tmp_path, upstream):
    collector = GrpcCollector()
    # A root sample ratio of 0: only a caller's sampled traceparent is exported.
    run = Running(
        pb,
        tmp_path,
        config_text(upstream.port, f'otlp_endpoint = "{collector.endpoint}"\nsample_ratio = 0.0'),
    )
    try:
        unsampled, untraced, sampled = new_trace_id(), new_trace_id(), new_trace_id()
        run.stub.GetToken(
            password_request(pb, RIGHT_PASSWORD, "Unsampled"),
            metadata=[("traceparent", traceparent(unsampled, sampled=False))],
            timeout=RPC_TIMEOUT_S,
        )
        # No traceparent: a root, sampled at 0.
        run.stub.GetToken(password_request(pb, RIGHT_PASSWORD, "Untraced"), timeout=RPC_TIMEOUT_S)
        # Sampled, and sent last: once its spans arrived, the earlier calls' would have too.
        run.stub.GetToken(
            password_request(pb, RIGHT_PASSWORD, "Sampled"),
            metadata=[("traceparent", traceparent(sampled))],
            timeout=RPC_TIMEOUT_S,
        )
        spans = collector.wait_for(
            lambda spans: len(of_trace(spans, sampled)) >= 2, "the sampled call's spans"
        )
    finally:
        run.stop()
        collector.stop()
    assert of_trace(spans, unsampled) == [], "an unsampled parent must not be exported"
    exported_traces = {span.trace_id for _, span in spans}
    assert exported_traces == {bytes.fromhex(sampled)}, "a root at sample_ratio 0 is not exported"
    # Logs still name the unsampled caller's trace.
    assert any(e.get("trace_id") == unsampled for e in run.tg.events()), run.tg.diagnostics()


def test_otel_environment_variables_configure_export(pb, tmp_path, upstream):
    collector = HttpCollector()
    run = Running(
        pb,
        tmp_path,
        config_text(upstream.port, ""),
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": "from-the-environment",
        },
    )
    try:
        trace_id = export_one_trace(pb, run, "FromEnv")
        spans = collector.wait_for(lambda s: len(of_trace(s, trace_id)) >= 2, "spans over http")
    finally:
        run.stop()
        collector.stop()
    resource = next(r for r, span in spans if span.trace_id == bytes.fromhex(trace_id))
    assert attrs(resource)["service.name"] == "from-the-environment"


def test_the_traces_endpoint_variable_is_the_full_url_and_wins(pb, tmp_path, upstream):
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is used as is, nothing appended; it and the traces
    # protocol win over the generic variables (which would send gRPC to /generic).
    collector = HttpCollector()
    run = Running(
        pb,
        tmp_path,
        config_text(upstream.port, ""),
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector.endpoint}/custom/traces",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"{collector.endpoint}/generic",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        },
    )
    try:
        trace_id = export_one_trace(pb, run, "TracesEndpoint")
        collector.wait_for(lambda s: len(of_trace(s, trace_id)) >= 2, "spans at the traces URL")
    finally:
        run.stop()
        collector.stop()
    assert {path for path, _ in collector.paths} == {"/custom/traces"}
    assert {kind for _, kind in collector.paths} == {"application/x-protobuf"}


def test_the_protocol_key_wins_over_protocol_variables_saying_grpc(pb, tmp_path, upstream):
    # The exporter library reads these variables itself unless told the protocol: a key
    # saying http/protobuf must not be turned into a refusal to build the exporter.
    collector = HttpCollector()
    run = Running(
        pb,
        tmp_path,
        config_text(
            upstream.port,
            f'otlp_endpoint = "{collector.endpoint}"\notlp_protocol = "http/protobuf"',
        ),
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"},
    )
    try:
        trace_id = export_one_trace(pb, run, "KeyProtocol")
        collector.wait_for(lambda s: len(of_trace(s, trace_id)) >= 2, "spans over http")
    finally:
        run.stop()
        collector.stop()
    assert {path for path, _ in collector.paths} == {"/v1/traces"}


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"])
def test_otlp_headers_reach_the_collector(pb, tmp_path, upstream, collector, variable):
    # The README sends a collector's credentials in these variables: every export, over
    # either protocol (gRPC through tokengate's own channel), must carry them.
    run = Running(
        pb,
        tmp_path,
        config_text(
            upstream.port,
            f'otlp_endpoint = "{collector.endpoint}"\notlp_protocol = "{collector.protocol}"',
        ),
        {variable: "x-collector-tenant=tenant-7,x-collector-note=a%20b"},
    )
    try:
        trace_id = export_one_trace(pb, run, f"Headers{collector.port}")
        collector.wait_for(lambda s: len(of_trace(s, trace_id)) >= 2, "spans")
    finally:
        run.stop()
        collector.stop()
    assert collector.headers, "no export seen"
    for headers in collector.headers:
        assert headers.get("x-collector-tenant") == "tenant-7", sorted(headers)
        assert headers.get("x-collector-note") == "a b", sorted(headers)


def export_one_trace(pb, run: Running, scope: str) -> str:
    """One sampled call; returns its trace id."""
    trace_id = new_trace_id()
    response = run.stub.GetToken(
        password_request(pb, RIGHT_PASSWORD, scope),
        metadata=[("traceparent", traceparent(trace_id))],
        timeout=RPC_TIMEOUT_S,
    )
    assert response.access_token == ACCESS_TOKEN
    return trace_id


def https_telemetry(collector) -> str:
    assert collector.endpoint.startswith("https://"), collector.endpoint
    return f'otlp_endpoint = "{collector.endpoint}"\notlp_protocol = "{collector.protocol}"'


def test_a_collector_behind_a_private_ca_is_trusted_through_its_certificate(
    pb, tmp_path, upstream, tls_collector, pki
):
    run = Running(
        pb,
        tmp_path,
        config_text(upstream.port, https_telemetry(tls_collector)),
        {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca_path)},
    )
    try:
        trace_id = export_one_trace(pb, run, f"PrivateCa{tls_collector.port}")
        tls_collector.wait_for(lambda s: len(of_trace(s, trace_id)) >= 2, "spans over TLS")
    finally:
        run.stop()


def test_without_its_certificate_a_private_ca_collector_is_not_trusted(
    pb, tmp_path, upstream, tls_collector
):
    # webpki's roots alone: the handshake fails, so certificates are verified.
    run = Running(pb, tmp_path, config_text(upstream.port, https_telemetry(tls_collector)))
    try:
        export_one_trace(pb, run, f"Untrusted{tls_collector.port}")
        run.tg.wait_for_event(
            lambda e: "cannot export spans" in e.get("fields", {}).get("message", ""),
            EXPORT_DEADLINE_S,
            "the export failure",
        )
    finally:
        run.stop()
    assert tls_collector.spans() == [], "an untrusted collector received spans"


def test_the_traces_certificate_variable_wins_over_the_generic_one(pb, tmp_path, upstream, pki):
    other = tmp_path / "other-ca"
    other.mkdir()
    wrong = Pki(other, "another")
    collector = GrpcCollector(tls=pki)
    run = Running(
        pb,
        tmp_path,
        config_text(upstream.port, https_telemetry(collector)),
        {
            "OTEL_EXPORTER_OTLP_CERTIFICATE": str(wrong.ca_path),
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(pki.ca_path),
        },
    )
    try:
        trace_id = export_one_trace(pb, run, "TracesCa")
        collector.wait_for(lambda s: len(of_trace(s, trace_id)) >= 2, "spans over TLS")
    finally:
        run.stop()
        collector.stop()


def every_call(pb, run: Running) -> int:
    """Calls across grants and client authentications, each carrying known secrets."""
    m = pb.msg
    grants = [
        m.GetTokenRequest(password=m.PasswordGrant(username="bob", password=RIGHT_PASSWORD, pin=PIN)),
        m.GetTokenRequest(client_id=POST_APP, password=m.PasswordGrant(username="bob", password=WRONG_PASSWORD)),
        m.GetTokenRequest(
            authorization_code=m.AuthorizationCodeGrant(
                code=AUTH_CODE, redirect_uri="https://app.example/cb", code_verifier=CODE_VERIFIER
            )
        ),
        m.GetTokenRequest(client_id=POST_APP, jwt_bearer=m.JwtBearerGrant(assertion=ASSERTION)),
        m.GetTokenRequest(refresh_token=m.RefreshTokenGrant(refresh_token=REFRESH_TOKEN_IN)),
        m.GetTokenRequest(ivr_pin=m.IvrPinGrant(ivr_pin=IVR_PIN)),
        m.GetTokenRequest(
            jwt_bearer=m.JwtBearerGrant(assertion=ASSERTION),
            client_assertion=m.ClientAssertion(assertion=CLIENT_ASSERTION),
        ),
        # A caller-chosen, unregistered client_id: the span says "public".
        m.GetTokenRequest(client_id=RAW_CLIENT_ID, password=m.PasswordGrant(username="bob", password=RIGHT_PASSWORD)),
        # Reports the token it got as refused: a second upstream round trip.
        m.GetTokenRequest(
            password=m.PasswordGrant(username="bob", password=RIGHT_PASSWORD, pin=PIN),
            rejected_access_token=ACCESS_TOKEN,
        ),
    ]
    calls = 0
    for request in grants:
        try:
            run.stub.GetToken(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError:
            pass  # the wrong password fails on purpose; its span is checked all the same
        calls += 1
    for client_id in (BASIC_APP, POST_APP):
        run.stub.RevokeToken(m.RevokeTokenRequest(token=REVOKED_TOKEN, client_id=client_id), timeout=RPC_TIMEOUT_S)
        calls += 1
    return calls


def test_no_secret_reaches_any_exported_span(pb, tmp_path, upstream, collector):
    run = Running(
        pb,
        tmp_path,
        config_text(
            upstream.port,
            f'otlp_endpoint = "{collector.endpoint}"\notlp_protocol = "{collector.protocol}"',
        ),
    )
    try:
        calls = every_call(pb, run)
        spans = collector.wait_for(
            lambda spans: sum(1 for _, s in spans if s.kind == SERVER) >= calls,
            f"{calls} server spans",
        )
    finally:
        run.stop()

    servers = [s for _, s in spans if s.kind == SERVER]
    assert len(servers) == calls
    names = {s.name for s in servers}
    assert names == {"tokengate.v1.TokenService/GetToken", "tokengate.v1.TokenService/RevokeToken"}
    assert any(attrs(s).get("client_id") == "public" for s in servers), "the unregistered caller is public"
    assert any(s.kind == CLIENT and attrs(s)["http.response.status_code"] == 400 for _, s in spans)
    assert any(e.name == "call failed" for s in servers for e in s.events), "span events were exported"

    # Every byte exported: attributes, events, resource, status messages, names.
    exported = b"".join(collector.raw)
    for secret in SECRETS:
        assert secret.encode() not in exported, f"{secret!r} reached an exported span"
    assert b"eyJ" not in exported, "a JWT reached an exported span"


def test_an_unreachable_collector_blocks_nothing_and_is_logged_once(pb, tmp_path, upstream):
    down = Unreachable()
    run = Running(
        pb,
        tmp_path,
        config_text(upstream.port, f'otlp_endpoint = "{down.endpoint}"', grace="2s"),
    )
    try:
        def call(i):
            response = run.stub.GetToken(
                password_request(pb, RIGHT_PASSWORD, f"Down{i}"), timeout=RPC_TIMEOUT_S
            )
            assert response.access_token == ACCESS_TOKEN

        call(0)
        run.tg.wait_for_event(
            lambda e: "cannot export spans" in e.get("fields", {}).get("message", ""),
            EXPORT_DEADLINE_S,
            "the export failure",
        )
        # More calls, and more failed exports after the first was reported.
        seen = down.accepted
        for i in range(1, 20):
            call(i)
        down.wait_accepted(seen + 5)
    finally:
        run.stop()
        down.stop()
    warnings = [
        e for e in run.tg.events() if "cannot export spans" in e.get("fields", {}).get("message", "")
    ]
    assert len(warnings) == 1, [w["fields"] for w in warnings]


def test_spans_buffered_at_shutdown_are_flushed(pb, tmp_path, upstream):
    collector = GrpcCollector()
    # Batches would wait a minute: only the flush at shutdown can deliver these spans.
    run = Running(
        pb,
        tmp_path,
        config_text(upstream.port, f'otlp_endpoint = "{collector.endpoint}"'),
        {"OTEL_BSP_SCHEDULE_DELAY": "60000"},
    )
    trace_id = new_trace_id()
    try:
        run.stub.GetToken(
            password_request(pb, RIGHT_PASSWORD, "AtShutdown"),
            metadata=[("traceparent", traceparent(trace_id))],
            timeout=RPC_TIMEOUT_S,
        )
        assert of_trace(collector.spans(), trace_id) == [], "nothing exported before shutdown"
    finally:
        run.stop()
    try:
        # Delivered before the process exited (stop() waited for that).
        assert len(of_trace(collector.spans(), trace_id)) == 2
    finally:
        collector.stop()


@pytest.mark.parametrize(
    "telemetry, env, named",
    [
        ("sample_ratio = 1.5", {}, "telemetry.sample_ratio"),
        ("sample_ratio = nan", {}, "telemetry.sample_ratio"),
        ('otlp_protocol = "http/json"', {}, "otlp_protocol"),
        ('otlp_endpoint = "collector:4317"', {}, "telemetry.otlp_endpoint"),
        ("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://collector"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ("", {"OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ("", {"TOKENGATE_TELEMETRY__SAMPLE_RATIO": "-1"}, "telemetry.sample_ratio"),
    ],
)
def test_check_config_refuses_bad_telemetry_values(tmp_path, upstream, telemetry, env, named):
    config = tmp_path / "tokengate.toml"
    config.write_text(config_text(upstream.port, telemetry))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENGATE_", "OTEL_"))}
    done = subprocess.run(
        [str(binary()), "check-config", "--config", str(config)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 64, (done.returncode, done.stdout, done.stderr)
    assert named in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_check_config_shows_the_telemetry_in_force(tmp_path, upstream):
    config = tmp_path / "tokengate.toml"
    config.write_text(config_text(upstream.port, ""))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENGATE_", "OTEL_"))}
    done = subprocess.run(
        [str(binary()), "check-config", "--config", str(config)],
        env={**clean, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
             "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "tg-env"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert 'otlp_endpoint = "http://collector:4318"' in done.stdout, done.stdout
    assert 'otlp_protocol = "http/protobuf"' in done.stdout, done.stdout
    assert 'service_name = "tg-env"' in done.stdout, done.stdout


def test_check_config_shows_a_traces_url_under_its_own_name(tmp_path, upstream):
    # As otlp_endpoint, the URL would mean <url>/v1/traces for http/protobuf.
    config = tmp_path / "tokengate.toml"
    config.write_text(config_text(upstream.port, ""))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENGATE_", "OTEL_"))}
    done = subprocess.run(
        [str(binary()), "check-config", "--config", str(config)],
        env={**clean, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/custom/traces",
             "OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4318",
             "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert 'otlp_traces_endpoint = "http://collector:4318/custom/traces"' in done.stdout, done.stdout
    assert "otlp_endpoint =" not in done.stdout, done.stdout
    assert 'otlp_protocol = "http/protobuf"' in done.stdout, done.stdout

    # A bad traces variable is refused, naming it.
    done = subprocess.run(
        [str(binary()), "check-config", "--config", str(config)],
        env={**clean, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "collector:4318/v1/traces",
             "OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4318"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 64, (done.returncode, done.stdout, done.stderr)
    assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" in done.stderr, done.stderr


def test_check_config_shows_the_collector_ca_path_and_refuses_a_bad_one(tmp_path, upstream, pki):
    config = tmp_path / "tokengate.toml"
    config.write_text(config_text(upstream.port, 'otlp_endpoint = "https://collector:4317"'))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENGATE_", "OTEL_"))}

    def check_config(env: dict) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(binary()), "check-config", "--config", str(config)],
            env={**clean, **env},
            capture_output=True,
            text=True,
            timeout=30,
        )

    done = check_config({"OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca_path)})
    assert done.returncode == 0, done.stderr
    assert f'otlp_certificate = "{pki.ca_path}"' in done.stdout, done.stdout
    assert "BEGIN CERTIFICATE" not in done.stdout, done.stdout

    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    for variable in ("OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE"):
        for bad in (tmp_path / "missing.pem", not_pem, empty):
            done = check_config({variable: str(bad)})
            assert done.returncode == 64, (variable, bad, done.returncode, done.stdout, done.stderr)
            assert f"{variable}: " in done.stderr, done.stderr
            assert str(bad) in done.stderr, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
